"""One scrape of ``vmtask exporter`` with BENCH_EXPORTER_TASKS (default 100,000) ended
tasks in Redis, against the baseline of the same run: a scrape that would compute
the same counters by reading every record (one pipelined HMGET per task).

The records are ended by the real start and finish scripts, so the metrics hash is
what workers leave; beside them, 4 hosts (heartbeats, queued messages), 200 VMs and
16 running tasks.  BENCH_ROUNDS rounds (default 10), alternating; medians.
Targets: a scrape <= 100 ms and <= 10 Redis round trips, whatever the history.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import generate_latest
from redis import Redis

from api.enums import VMVMState
from api.exporter import registry_for
from api.protocol import keys, records
from api.scripts import Scripts
from api.store import connect
from bench.common import ROUNDS, Cost, alternate, counting, meter_for, record_row, stack, verdict

N = int(os.environ.get("BENCH_EXPORTER_TASKS", "100000"))
HOSTS = [f"bench-{i}" for i in range(4)]
OPERATIONS = ["vmtask.ping", "vmtask.disk.create_dynamic", "vmtask.vm.startup", "vmtask.vm.save"]
TARGET_MS = 100.0
TARGET_ROUND_TRIPS = 10


def seed(redis: Redis) -> list[str]:
    """N ended tasks, hosts, VMs and running tasks; the ended tasks' ids."""
    scripts = Scripts.of(redis)
    start, finish = scripts.task_start, scripts.task_finish
    redis.script_load(start.script)
    redis.script_load(finish.script)
    now = time.time()
    ids: list[str] = []
    for first in range(0, N, 5000):
        pipe = redis.pipeline(transaction=False)
        for index in range(first, min(first + 5000, N)):
            task_id = f"00000000-0000-4000-8000-{index:012d}"
            ids.append(task_id)
            record, lease = keys.task_record(task_id), keys.task_lease(task_id)
            host, operation = HOSTS[index % len(HOSTS)], OPERATIONS[index % len(OPERATIONS)]
            pipe.hset(record, mapping={"name": operation, "host": host, "state": "PENDING",
                                       "created": repr(now - 60), "cancelable": "1",
                                       "percent": "0", "description": "bench"})
            pipe.zadd(keys.RECENT_TASKS, {task_id: now - 60})
            start.queue(pipe, record=record, lease=lease, running=keys.RUNNING_TASKS,
                        now=repr(now - 60 + index % 13), worker="w:m:1", lease_ms=60_000,
                        task_id=task_id, node="n")
            failed = index % 10 == 0
            finish.queue(pipe, record=record, lease=lease, running=keys.RUNNING_TASKS,
                         channel=keys.task_channel(task_id),
                         state=records.FAILURE if failed else records.SUCCESS,
                         result=4 if failed else 0, error=0, description="",
                         finished=repr(now - 40 + index % 29), percent=100, retention=86400,
                         task_id=task_id, only_if_lease_expired="0", output="")
        pipe.execute()
    pipe = redis.pipeline(transaction=False)
    for host in HOSTS:
        pipe.sadd(keys.KNOWN_HOSTS, host)
        pipe.set(keys.host_heartbeat(host), json.dumps({"host": host,
                                                        "storage_free_bytes": 10**12}))
        pipe.lpush(keys.host_queue(host), *[f"m{i}" for i in range(5)])
    for index in range(200):
        name = f"vm{index}"
        pipe.hset(keys.vm_record(name), mapping={"name": name, "host": HOSTS[index % 4],
                                                 "state": str(int(VMVMState.Running))})
        pipe.sadd(keys.VM_NAMES, name)
    for index in range(16):
        task_id = f"11111111-0000-4000-8000-{index:012d}"
        pipe.hset(keys.task_record(task_id), mapping={"name": "vmtask.ping",
                                                      "host": HOSTS[index % 4],
                                                      "state": records.STARTED})
        pipe.sadd(keys.RUNNING_TASKS, task_id)
    pipe.execute()
    return ids


def main() -> None:
    with stack(vmtask=False, bare=False) as s:
        client = connect(s.url)
        began = time.monotonic()
        ids = seed(client)
        print(f"seeded {N:,} ended tasks in {time.monotonic() - began:.1f} s")
        registry = registry_for(client)
        meter = meter_for(s, "vmtask")

        def exporter_side() -> Cost:
            return meter.run(1, lambda: generate_latest(registry))

        def scan_side() -> Cost:
            def run() -> None:
                pipe = client.pipeline(transaction=False)
                for task_id in ids:
                    pipe.hmget(keys.task_record(task_id), "name", "host", "result",
                               "created", "started", "finished")
                totals: dict[tuple[str, str, str], int] = {}
                for name, host, result, *_ in pipe.execute():
                    totals[(name, host, result)] = totals.get((name, host, result), 0) + 1
                assert sum(totals.values()) == N
            return meter.run(1, run)

        with counting() as counter:
            text = generate_latest(registry).decode()
        trips = counter.round_trips
        assert "vmtask_up 1.0" in text
        alternate(1, {"exporter": exporter_side, "scan": scan_side})  # warm-up
        results = alternate(ROUNDS, {"exporter": exporter_side, "scan": scan_side})
    ours, base = results["exporter"], results["scan"]
    o = statistics.median(c.wall for c in ours) * 1000
    b = statistics.median(c.wall for c in base) * 1000
    ratios = [x.wall / y.wall for x, y in zip(ours, base, strict=True)]
    met = o <= TARGET_MS and trips <= TARGET_ROUND_TRIPS
    print(f"A scrape with {N:,} ended tasks in Redis, {ROUNDS} alternating rounds (median):")
    print(f"  vmtask exporter scrape          {o:8.1f} ms, {trips} round trips "
          f"(rounds {min(c.wall for c in ours) * 1000:.1f}-{max(c.wall for c in ours) * 1000:.1f})")
    print(f"  scanning every record (baseline) {b:8.1f} ms, 1 round trip of {N:,} HMGETs")
    print(f"ratio exporter / scan: {statistics.median(ratios):.3f}x; target <= {TARGET_MS:g} ms "
          f"and <= {TARGET_ROUND_TRIPS} round trips: {verdict(met)}")
    record_row(f"exporter scrape, {N:,} tasks in Redis", f"{o:.1f} ms, {trips} round trips",
               f"scan of every record {b:.0f} ms",
               f"{statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f})",
               f"<= {TARGET_MS:g} ms, <= {TARGET_ROUND_TRIPS} round trips", met)


if __name__ == "__main__":
    main()
