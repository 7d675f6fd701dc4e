"""A host's background cost in Redis, alone and beside a simulated fleet (issue 27).

One real, idle vmtask worker (host ``bench``, default settings: a 10 s heartbeat,
so a beat every 3.3 s) runs against its own Redis for BENCH_SCALE_SECONDS (30),
first alone, then beside a fleet written in the product's own formats:

- BENCH_SCALE_HOSTS (1,000) other live hosts: heartbeats as `HostBeacon.status`
  writes them, their worker presence, the known-hosts set;
- BENCH_SCALE_TASKS (4,000) running tasks spread over them: submitted through
  `TaskStore.create` and started through the start script, as a worker does (lease
  and deadline 10 min ahead: live for the whole run);
- BENCH_SCALE_VMS (10,000) VM records, created with `create_virtual_machine`.

Measured both ways, from Redis itself: commands per second (INFO commandstats,
every command a script runs included) and Redis CPU per second (INFO cpu, less
Redis's own cost with the same data and no worker: its cron and key expiry).
The worker is stopped while the fleet is written and started again beside it.

Then a probe: this process runs the worker's own beat (`HostBeacon`: heartbeat,
status counters, reaping, duties, the VM watch) BENCH_SCALE_BEATS (300) times
back to back for a host of the fleet, alone (an empty Redis) and beside the
fleet, and reads the Redis commands and CPU per beat, as issue 27 measured them.
Per beat, times 3 beats per heartbeat period (10 s), times 1,000 hosts, is the
fleet's heartbeats and reaping.  (A beat's duties run once per period for the
whole fleet: counting them on every beat overstates the fleet.)

Then, with the fleet present, the latency of `hosts`, `host_status()`,
`virtual_machines` and `tasks(state=STARTED)`, against a raw redis-py read of the
same keys.

Targets: commands/s beside the fleet <= 2x alone; the fleet's heartbeats and
reaping at 1,000 hosts <= 10% of one Redis core; hosts and host_status() <= 50 ms;
virtual_machines <= 100 ms.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redis import Redis

from api import VirtualServer
from api.protocol import keys, records
from api.protocol.tasks import PING
from api.publish import message_commands
from api.scripts import Scripts
from api.settings import Settings
from bench.common import HOST, ROUNDS, record_row, verdict
from workers.devtools.sandbox import RedisServer, WorkerProcess
from workers.factory import HOST_HOOKS
from workers.host import HostBeacon
from workers.resend import LostMessageWatch
from workers.tasks import vms

SECONDS = float(os.environ.get("BENCH_SCALE_SECONDS", "30"))
HOSTS = int(os.environ.get("BENCH_SCALE_HOSTS", "1000"))
TASKS = int(os.environ.get("BENCH_SCALE_TASKS", "4000"))
VMS = int(os.environ.get("BENCH_SCALE_VMS", "10000"))
BEATS = int(os.environ.get("BENCH_SCALE_BEATS", "300"))
BEATS_PER_SECOND = 3 / Settings().heartbeat_seconds  # a beat every third of the heartbeat
SETTLE_SECONDS = 15.0  # the worker's start-up work (hooks, its first lost-message check)
LIVE_MS = 600_000  # the simulated fleet's heartbeats and leases outlive the run
CMD_RATIO_TARGET = 2.0
FLEET_CPU_TARGET = 0.10  # of one core, at 1,000 hosts
HOSTS_TARGET_MS, VMS_TARGET_MS = 50.0, 100.0


def redis_cpu(client: Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def redis_calls(client: Redis) -> int:
    return sum(int(v["calls"]) for v in client.info("commandstats").values())


def window(client: Redis, seconds: float) -> tuple[float, float]:
    """(commands/s, Redis CPU s/s) over ``seconds``; this function's own INFO calls
    (three, counted in the window) are taken out."""
    calls, cpu, start = redis_calls(client), redis_cpu(client), time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - start
    calls_after, cpu_after = redis_calls(client), redis_cpu(client)
    return (calls_after - calls - 3) / elapsed, (cpu_after - cpu) / elapsed


def fake_heartbeat(host: str, root: str) -> str:
    """What `HostBeacon.status` writes, for a host that is not really there."""
    return json.dumps({
        "host": host, "machine": f"{host}.example", "pid": 4242, "started": time.time(),
        "heartbeat": time.time(), "storage_root": root, "storage_free_bytes": 10**12,
        "transfer_address": "10.0.0.1", "transfer_ports": [10809, 10819],
        "tasks_running": TASKS // max(1, HOSTS), "vms": VMS // max(1, HOSTS),
        "vms_running": 0})


def build_fleet(server: VirtualServer, client: Redis, root: str) -> list[str]:
    hosts = [f"sim-{i:04d}" for i in range(HOSTS)]
    pipe = client.pipeline(transaction=False)
    for host in hosts:
        pipe.set(keys.host_heartbeat(host), fake_heartbeat(host, root), px=LIVE_MS)
        pipe.zadd(keys.host_workers(host), {f"{host}:m:4242": time.time() + LIVE_MS / 1000})
        pipe.sadd(keys.KNOWN_HOSTS, host)
    pipe.execute()
    # Running tasks: submitted and started as the producer and a worker do.
    start = Scripts.of(client).task_start
    for i in range(TASKS):
        host = hosts[i % HOSTS]
        task_id = f"sim-task-{i:05d}"
        queue = keys.host_queue(host)
        kwargs = {"duration_ms": 600_000, "steps": 10}
        message = message_commands(server.celery, PING.name, kwargs=kwargs, task_id=task_id,
                                   queue=queue, routing_key=queue)
        assert server.store.create(task_id, name=PING.name, description="simulated",
                                   host=host, cancelable=True, arguments=kwargs,
                                   message=message)
        worker = f"{host}:m:4242"
        assert start(record=keys.task_record(task_id), lease=keys.task_lease(task_id),
                     running=keys.RUNNING_TASKS, host_running=keys.host_running(host),
                     deadlines=keys.LEASE_DEADLINES, host_pending=keys.host_pending(host),
                     now=repr(time.time()), worker=worker, lease_ms=LIVE_MS,
                     task_id=task_id) == records.BEGUN
    # Their messages were taken by their (simulated) workers.
    client.delete(*[keys.host_queue(h) for h in hosts])
    for i in range(VMS):
        server.create_virtual_machine(f"sim-vm-{i:05d}", 256, [f"disks/sim-{i:05d}.qcow2"],
                                      host=hosts[i % HOSTS])
    return hosts


def probe_beats(redis: RedisServer, server: VirtualServer, host: str, storage: Path,
                idle_cpu_per_s: float) -> tuple[float, float]:
    """(Redis commands, Redis CPU seconds) per beat of ``host``'s `HostBeacon`, run
    here BEATS times back to back; Redis's idle CPU over the burst taken out."""
    settings = Settings.from_env({"VMTASK_REDIS_URL": redis.url, "VMTASK_HOST": host,
                                  "VMTASK_STORAGE_ROOT": str(storage)})
    beacon = HostBeacon(settings, HOST_HOOKS, None, None, LostMessageWatch(server.celery))
    client = redis.client()

    def one() -> None:  # `HostBeacon.run`'s loop body
        vms._beat_read.clear()  # beats are 3.3 s apart: each reads the VMs afresh
        beacon.beat()
        beacon.reap()
        beacon.duties()
        for hook in HOST_HOOKS.tick:
            hook(beacon.client, settings)

    one()  # warm-up: script load
    calls, cpu, start = redis_calls(client), redis_cpu(client), time.monotonic()
    for _ in range(BEATS):
        one()
    elapsed = time.monotonic() - start
    calls_after, cpu_after = redis_calls(client), redis_cpu(client)
    beacon.client.close()
    spent = max(0.0, cpu_after - cpu - idle_cpu_per_s * elapsed)
    return (calls_after - calls - 2) / BEATS, spent / BEATS


def latency(rounds: int, call: Callable[[], Any]) -> list[float]:
    call()  # warm-up (script load, connection)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="vmtask-bench-scale-") as t:
        tmp = Path(t)
        storage = tmp / "storage"
        storage.mkdir()
        redis = RedisServer(tmp / "redis", appendonly=True).start()
        worker: WorkerProcess | None = None
        try:
            client = redis.client()
            server = VirtualServer(redis.url, host=HOST, poll_interval=0.5)
            _, idle0 = window(client, min(10.0, SECONDS / 2))  # no worker, no data
            probe_alone = probe_beats(redis, server, "probe", storage, idle0)
            client.delete(*client.keys("vmtask:*"))  # the probe's traces (our own Redis)

            worker = WorkerProcess(redis.url, HOST, storage, tmp, concurrency=4, include=())
            worker.start()
            time.sleep(SETTLE_SECONDS)
            alone_cmds, alone_cpu = window(client, SECONDS)
            worker.stop()

            built = time.monotonic()
            build_fleet(server, client, str(storage))
            built_s = time.monotonic() - built
            _, idle1 = window(client, min(10.0, SECONDS / 2))  # the fleet's data, no worker
            probe_fleet = probe_beats(redis, server, "sim-0000", storage, idle1)

            worker.start()
            assert len(server.hosts) == HOSTS + 1
            time.sleep(SETTLE_SECONDS)
            fleet_cmds, fleet_cpu = window(client, SECONDS)
            assert worker.proc is not None and worker.proc.poll() is None

            lat = {
                "hosts": latency(ROUNDS, lambda: server.hosts),
                "host_status()": latency(ROUNDS, server.host_status),
                "virtual_machines": latency(ROUNDS, lambda: server.virtual_machines),
                "tasks(state=STARTED)": latency(
                    ROUNDS, lambda: server.tasks(state=records.STARTED, limit=50)),
            }
            names = sorted(client.smembers(keys.KNOWN_HOSTS))
            vm_names = sorted(client.smembers(keys.VM_NAMES))

            def raw_vms() -> None:
                pipe = client.pipeline(transaction=False)
                for name in vm_names:
                    pipe.hgetall(keys.vm_record(name))
                pipe.execute()

            floor = {
                "hosts": latency(ROUNDS, lambda: client.mget(
                    [keys.host_heartbeat(n) for n in names])),
                "virtual_machines": latency(ROUNDS, raw_vms),
            }
            server.close()
        finally:
            if worker is not None:
                worker.stop()
            redis.stop()

    own_alone, own_fleet = max(0.0, alone_cpu - idle0), max(0.0, fleet_cpu - idle1)
    cmd_ratio = fleet_cmds / alone_cmds
    per_host = probe_fleet[1] * BEATS_PER_SECOND  # Redis CPU s/s of one host's beats
    fleet_share = per_host * 1000  # 1,000 such hosts, of one core
    largest = int(FLEET_CPU_TARGET / per_host) if per_host > 0 else 0
    med = {name: statistics.median(times) for name, times in lat.items()}
    floor_med = {name: statistics.median(times) for name, times in floor.items()}
    print(f"One idle worker, {SECONDS:g} s windows; fleet: {HOSTS:,} hosts, {TASKS:,} running "
          f"tasks, {VMS:,} VMs (written in {built_s:.0f} s).  Redis idle: "
          f"{idle0 * 1000:.2f} ms CPU/s empty, {idle1 * 1000:.2f} with the fleet's data")
    for label, cmds, cpu in (("alone", alone_cmds, own_alone),
                             ("beside the fleet", fleet_cmds, own_fleet)):
        print(f"  {label:17} {cmds:7.1f} commands/s, Redis CPU {cpu * 1000:6.2f} ms/s "
              "above idle")
    print(f"  commands/s ratio {cmd_ratio:.2f}x (target <= {CMD_RATIO_TARGET:g}x): "
          f"{verdict(cmd_ratio <= CMD_RATIO_TARGET)}")
    for label, (cmds, cpu) in (("alone", probe_alone), ("beside the fleet", probe_fleet)):
        print(f"  one beat, {label:17} {cmds:6.1f} Redis commands, "
              f"{cpu * 1e6:6.1f} us Redis CPU")
    print(f"  1,000 hosts' beats ({BEATS_PER_SECOND:.1f}/s each): {fleet_share * 100:.2f}% of "
          f"one Redis core (target <= {FLEET_CPU_TARGET * 100:g}%): "
          f"{verdict(fleet_share <= FLEET_CPU_TARGET)}; 10% of a core serves {largest:,} hosts")
    for name, times in lat.items():
        base = f", raw read {floor_med[name]:.1f} ms" if name in floor_med else ""
        print(f"  {name:22} {med[name]:7.1f} ms (rounds {min(times):.1f}-{max(times):.1f}{base})")
    hosts_ok = max(med["hosts"], med["host_status()"]) <= HOSTS_TARGET_MS
    vms_ok = med["virtual_machines"] <= VMS_TARGET_MS
    print(f"  hosts/host_status <= {HOSTS_TARGET_MS:g} ms: {verdict(hosts_ok)}; "
          f"virtual_machines <= {VMS_TARGET_MS:g} ms: {verdict(vms_ok)}")

    record_row(f"idle worker beside {HOSTS:,} hosts / {TASKS:,} running tasks: Redis commands/s",
               f"{fleet_cmds:.1f}/s", f"alone {alone_cmds:.1f}/s", f"{cmd_ratio:.2f}x",
               f"<= {CMD_RATIO_TARGET:g}x", cmd_ratio <= CMD_RATIO_TARGET)
    record_row("Redis CPU of one idle worker beside the fleet (above Redis idle)",
               f"{own_fleet * 1000:.2f} ms/s", f"alone {own_alone * 1000:.2f} ms/s",
               f"{own_fleet / own_alone:.2f}x" if own_alone else "", "", None)
    record_row("one host's beat beside the fleet: Redis commands, Redis CPU",
               f"{probe_fleet[0]:.1f}, {probe_fleet[1] * 1e6:.0f} us",
               f"alone {probe_alone[0]:.1f}, {probe_alone[1] * 1e6:.0f} us",
               f"{probe_fleet[1] / probe_alone[1]:.2f}x CPU" if probe_alone[1] else "", "", None)
    record_row(f"{HOSTS:,} hosts' heartbeats and reaping, Redis CPU",
               f"{fleet_share * 100:.2f}% of a core", "",
               f"10% of a core serves {largest:,} hosts", f"<= {FLEET_CPU_TARGET * 100:g}%",
               fleet_share <= FLEET_CPU_TARGET)
    for name, target in (("hosts", HOSTS_TARGET_MS), ("host_status()", HOSTS_TARGET_MS),
                         ("virtual_machines", VMS_TARGET_MS), ("tasks(state=STARTED)", None)):
        base = floor_med.get(name)
        record_row(f"`{name}` with {HOSTS:,} hosts, {VMS:,} VMs, {TASKS:,} tasks",
                   f"{med[name]:.1f} ms",
                   f"raw read {base:.1f} ms" if base is not None else "",
                   f"{med[name] / base:.2f}x" if base else "",
                   f"<= {target:g} ms" if target else "",
                   med[name] <= target if target else None)


if __name__ == "__main__":
    main()
