"""A random fault campaign, seeded and replayable: three worker hosts, a mixed
workload (pings, creates, converts, cross-host copies, cold moves, marker tasks,
about a quarter cancelled; in the long run also a running guest migrated live,
paused and resumed) and a fault every 2-5 s: kill -9 of a worker host
(restarted afterwards), Redis SIGSTOP for 1-4 s, a Redis restart (SIGTERM, AOF),
a Redis kill -9 (AOF fsync everysec: it may lose up to a second), and duplicate
messages, copies of queued and running tasks among them.

At the end: every task ended; no record ran more than once (``runs``, and each
marker task's own line in its file); every Success is byte-exact (qemu-img compare
against the source); no temporary is left and a failed output is not there; a VM
moved cold is whole on the host its record names and nowhere else; every other
result is one its faults explain (Cancelled: cancelled; ThreadCrashError: a worker
of its host, or its peer's, killed while it ran, and judged within its lease and a
margin of that kill, or of Redis's return from a restart after it).

The seed is printed, and named in every failure.  Replay one with
``CAMPAIGN_SEED=<seed>``: the same work and the same faults in the same
order (where a fault meets a task still depends on timing).  The default run has a short campaign
(``CAMPAIGN_SECONDS`` of faults, 25 by default); the long one is marked
``campaign`` and left out of the default run: ``pytest -m campaign`` (its length:
``CAMPAIGN_LONG_SECONDS``, 240 by default).  ``CAMPAIGN_LIVE=1`` adds
the guest to the short run, ``=0`` leaves it out of the long one.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from api import (
    VirtualMachine,
    VirtualServer,
    VMHardDiskType,
    VMTask,
    VMTaskResult,
    VMVMState,
    errors,
)
from api.protocol import keys
from tests.helpers import digest, pids_of, qemu_io
from workers.devtools.sandbox import RedisServer, WorkerProcess, wait_until
from workers.devtools.tinyguest import build_tiny_guest

pytestmark = pytest.mark.slow
HOSTS = ("ca", "cb", "cc")
LEASE = 8
# Short bounds, so the campaign drains fast: a lost message is back on its queue
# after VISIBILITY s, a crashed task judged after LEASE s.
ENV = {"VMTASK_LEASE_SECONDS": str(LEASE), "VMTASK_HEARTBEAT_SECONDS": "2",
       "VMTASK_TRANSFER_STALL_SECONDS": "12", "VMTASK_VISIBILITY_TIMEOUT_SECONDS": "10"}
FORMATS = {"qcow2": "qcow2", "vhd": "vpc", "vhdx": "vhdx", "img": "raw"}
MiB = 1 << 20
# A task on a killed host is judged crashed within its lease, and the reaper's
# round (a heartbeat) or a peer's confirmation after it, counted from the kill or
# from Redis's return after a restart, whichever is later (docs/operations/sentinel.md:
# the crash bound counts from the end of a failover, and a restarted Redis is a new
# primary).
CRASH_BOUND = LEASE + 10
# How long the end waits for the last tasks: a lost message's visibility timeout
# and kombu's restore scan, a lease, the longest task.
DRAIN_SECONDS = 150


def seed_of() -> int:
    raw = os.environ.get("CAMPAIGN_SEED")
    return int(raw) if raw else random.SystemRandom().randrange(1, 10**9)


@dataclass
class Job:
    kind: str
    task: VMTask
    host: str
    peer: str | None
    submitted: float
    details: dict[str, Any] = field(default_factory=dict)
    cancelled: bool = False


@dataclass
class Campaign:
    seed: int
    rng: random.Random
    redis: RedisServer
    workers: dict[str, WorkerProcess]
    start_worker: Callable[[str], WorkerProcess]
    base: Path
    jobs: list[Job] = field(default_factory=list)
    faults: list[tuple[float, str, str]] = field(default_factory=list)
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    counter: int = 0
    # The running guest that live migrations, pauses and resumes work on (None: no
    # VM work), and its operation in flight: one at a time, as a user's would be.
    vm: str | None = None
    vm_job: Job | None = None

    def root(self, host: str) -> Path:
        return self.workers[host].storage_root

    def log(self, kind: str, what: str) -> None:
        with self.lock:
            self.faults.append((time.time(), kind, what))  # wall time, as records keep

    # -- the workload ------------------------------------------------------------

    def submit_one(self, server: VirtualServer) -> None:
        rng = self.rng
        self.counter += 1
        n = self.counter
        host = rng.choice(HOSTS)
        kind = rng.choices(["ping", "create", "convert", "copy", "move", "marker", "vm"],
                           weights=[3, 2, 3, 3, 1, 2, 2 if self.vm else 0])[0]
        if kind == "vm":
            self.vm_operation(server)
            return
        details: dict[str, Any] = {}
        peer: str | None = None
        submitted = time.time()
        if kind == "ping":
            task = server.ping(duration_ms=rng.randrange(100, 3000), steps=5, host=host)
        elif kind == "create":
            details["path"] = f"out/create{n}.qcow2"
            task = server.create_dynamic_virtual_hard_disk(details["path"], 16, host=host)
        elif kind == "convert":
            ext = rng.choice(list(FORMATS))
            details.update(source=f"src/{host}.img", path=f"out/convert{n}.{ext}")
            task = server.get_hard_disk(details["source"], host=host).convert(
                details["path"], VMHardDiskType.Dynamic)
        elif kind == "copy":
            peer = host
            host = rng.choice([h for h in HOSTS if h != peer])
            ext = rng.choice(list(FORMATS))
            details.update(source=f"src/{peer}.img", path=f"out/copy{n}.{ext}")
            task = server.get_hard_disk(details["source"], host=peer).copy_to(
                host, details["path"])
        elif kind == "move":
            peer = host  # the source; the task the producer follows runs on the target
            host = rng.choice([h for h in HOSTS if h != peer])
            name = f"cm{n}"
            disk = self.root(peer) / name / "d.img"
            disk.parent.mkdir(parents=True, exist_ok=True)
            disk.write_bytes(random.Random(n).randbytes(4 * MiB))
            details.update(name=name, digest=digest(disk), source=peer)
            vm = server.create_virtual_machine(name, memory_mb=32, disks=[f"{name}/d.img"],
                                               network=None, host=peer)
            task = vm.migrate(host)
        else:
            details["marker"] = str(self.base / f"marker{n}.txt")
            task = server.submit("tests.write_marker", description="marker", cancelable=True,
                                 kwargs={"path": details["marker"]}, host=host)
        job = Job(kind, task, host, peer, submitted, details)
        if rng.random() < 0.25:
            job.details["cancel_after"] = rng.uniform(0.0, 3.0)
        with self.lock:
            self.jobs.append(job)

    def vm_operation(self, server: VirtualServer) -> None:
        """Migrate the guest live, pause or resume it, once its last operation ended."""
        assert self.vm is not None
        if self.vm_job is not None and not self.vm_job.task.is_complete:
            return
        vm = server.find_virtual_machine(self.vm)
        assert vm is not None
        state, host = vm.state, vm.host
        if state not in (VMVMState.Running, VMVMState.Paused):
            return  # Invalid while its host is away, say: nothing to do now
        choice = self.rng.choice(["live", "live", "toggle"])
        submitted = time.time()
        if choice == "live":
            target = self.rng.choice([h for h in HOSTS if h != host])
            task, kind, peer, runs_on = vm.migrate(target), "live", target, host
        else:
            task = vm.pause() if state is VMVMState.Running else vm.resume()
            kind, peer, runs_on = "toggle", None, host
        job = Job(kind, task, runs_on, peer, submitted, {"name": self.vm})
        if kind == "live" and self.rng.random() < 0.25:
            job.details["cancel_after"] = self.rng.uniform(0.0, 3.0)
        self.vm_job = job
        with self.lock:
            self.jobs.append(job)

    def workload(self) -> None:
        with VirtualServer(self.redis.url, host=HOSTS[0], poll_interval=0.5) as server:
            while not self.stop.is_set():
                try:
                    self.submit_one(server)
                except errors.VMTaskError as exc:  # refused while Redis or a host is away
                    self.refused[type(exc).__name__] += 1
                except Exception as exc:  # noqa: BLE001 - a raw exception is a finding
                    with self.lock:
                        self.problems.append(f"a submit raised {type(exc).__name__}: {exc}")
                self.cancel_due(server)
                self.stop.wait(self.rng.uniform(0.2, 0.7))

    def cancel_due(self, server: VirtualServer) -> None:
        now = time.time()
        with self.lock:
            due = [j for j in self.jobs if not j.cancelled and "cancel_after" in j.details
                   and now - j.submitted >= j.details["cancel_after"]]
        for job in due:
            job.cancelled = True
            try:
                server.get_task(job.task.id).cancel()
            except errors.VMTaskError:
                pass  # complete already, or Redis away: either way nothing to cancel

    # -- the faults --------------------------------------------------------------

    def inject(self, server_for_copies: VirtualServer) -> None:
        rng = self.rng
        while not self.stop.wait(rng.uniform(2.0, 5.0)):
            fault = rng.choices(["kill_worker", "sigstop", "restart", "kill9", "duplicate"],
                                weights=[2, 2, 2, 2, 2])[0]
            if fault == "kill_worker":
                host = rng.choice(HOSTS)
                self.log(fault, host)
                self.workers[host].kill()
                time.sleep(rng.uniform(0.5, 3.0))  # the host stays dead this long
                self.workers[host] = self.start_worker(host)
            elif fault == "sigstop":
                assert self.redis.proc is not None
                pause = rng.uniform(1.0, 4.0)
                self.log(fault, f"{pause:.1f} s")
                os.kill(self.redis.proc.pid, signal.SIGSTOP)
                time.sleep(pause)
                os.kill(self.redis.proc.pid, signal.SIGCONT)
            elif fault in ("restart", "kill9"):
                down = rng.uniform(0.5, 2.0)
                self.log(fault, f"down {down:.1f} s")
                assert self.redis.proc is not None
                if fault == "kill9":
                    os.kill(self.redis.proc.pid, signal.SIGKILL)
                    self.redis.proc.wait()
                    self.redis.proc = None
                else:
                    self.redis.stop()
                time.sleep(down)
                self.redis.start()
                # A restarted Redis has a new replication id: like a failover's new
                # primary, it restarts the crash bound (leases could not be renewed
                # while it was down), so crash judgments wait a lease from here.
                self.log("redis-back", fault)
            else:
                with self.lock:
                    candidates = list(self.jobs[-12:])
                if candidates:
                    job = rng.choice(candidates)
                    self.log(fault, job.task.id)
                    try:
                        duplicate(server_for_copies, job.task.id)
                    except Exception as exc:  # noqa: BLE001 - Redis away: no copy sent
                        self.log("duplicate-refused", f"{job.task.id}: {exc}")


def duplicate(server: VirtualServer, task_id: str) -> None:
    """Send a second copy of a task's message, as a broker redelivery would."""
    record = server.redis.hgetall(keys.task_record(task_id))
    if not record:
        return
    arguments = json.loads(record["arguments"])
    arguments.pop("args", None)
    host = record["host"]
    server.celery.send_task(record["name"], kwargs=arguments, task_id=task_id,
                            queue=keys.host_queue(host), routing_key=keys.host_queue(host))


def compare(left: Path, left_format: str, right: Path) -> str | None:
    """None when the two images hold the same guest bytes; qemu-img's words otherwise."""
    result = subprocess.run(["qemu-img", "compare", "-U", "-f", left_format,
                             "-F", FORMATS[right.suffix[1:]], str(left), str(right)],
                            capture_output=True, text=True)
    return None if result.returncode == 0 else (result.stdout + result.stderr).strip()


def last_kill(campaign: Campaign, hosts: set[str], since: float, until: float
              ) -> float | None:
    """When a worker of one of ``hosts`` was last killed between the two times."""
    kills = [at for at, kind, what in campaign.faults
             if kind == "kill_worker" and what in hosts and since - 1.0 <= at <= until]
    return max(kills, default=None)


def redis_back(campaign: Campaign, until: float) -> float:
    """When Redis last came back from a restart or kill -9 before ``until`` (0: never)."""
    return max((at for at, kind, _ in campaign.faults if kind == "redis-back" and at <= until),
               default=0.0)


def redis_killed_near(campaign: Campaign, at: float) -> bool:
    """A Redis kill -9 within a couple of seconds after ``at``: AOF everysec may have
    lost what was written then."""
    return any(kind == "kill9" and at - 0.5 <= when <= at + 2.5
               for when, kind, _ in campaign.faults)


def check_job(campaign: Campaign, job: Job, client: Any) -> list[str]:
    """What is wrong with one job's end, in words (nothing: an empty list)."""
    snap = job.task.snapshot()
    wrong: list[str] = []
    where = f"{job.kind} {job.task.id} on {job.host}"
    result = snap.result
    ended = getattr(result, "name", result)
    runs = int(client.hget(keys.task_record(job.task.id), "runs") or 0)
    if runs > 1:
        wrong.append(f"{where} ran {runs} times")
    hosts = {job.host} | ({job.peer} if job.peer else set())
    if result is VMTaskResult.Cancelled and not job.cancelled:
        wrong.append(f"{where} Cancelled, never cancelled: {snap.error_description}")
    elif result is VMTaskResult.ThreadCrashError:
        finished = float(client.hget(keys.task_record(job.task.id), "finished")
                         or time.time())
        killed = last_kill(campaign, hosts, job.submitted, finished)
        if killed is None:
            wrong.append(f"{where} ThreadCrashError with no worker of {sorted(hosts)} "
                         f"killed: {snap.error_description}")
        elif finished - (since := max(killed, redis_back(campaign, finished))) > CRASH_BOUND:
            wrong.append(f"{where} ThreadCrashError {finished - since:.1f} s after the "
                         f"kill or the Redis restart after it (bound {CRASH_BOUND} s): "
                         f"{snap.error_description}")
    elif result not in (VMTaskResult.Success, VMTaskResult.Cancelled,
                        VMTaskResult.ThreadCrashError):
        wrong.append(f"{where} ended {ended} {hex(snap.error)}: "
                     f"{snap.error_description}")
    success = result is VMTaskResult.Success
    root = campaign.root(job.host)
    if job.kind in ("convert", "copy"):
        output = root / job.details["path"]
        source = campaign.root(job.peer or job.host) / job.details["source"]
        if success:
            if (differs := compare(source, "raw", output)) is not None:
                wrong.append(f"{where}: output differs from its source: {differs}")
        elif output.exists():
            wrong.append(f"{where} ended {ended} but left {job.details['path']}")
    elif job.kind == "create":
        if success != (root / job.details["path"]).exists():
            wrong.append(f"{where} ended {ended}; output exists: {not success}")
    elif job.kind == "marker":
        lines = Path(job.details["marker"]).read_text().split() if Path(
            job.details["marker"]).exists() else []
        if len(lines) > 1 or (success and lines != [job.task.id]):
            wrong.append(f"{where} ended {ended}; its marker says {lines}")
    elif job.kind == "move":
        wrong += check_move(campaign, job, client)
    return wrong


def check_move(campaign: Campaign, job: Job, client: Any) -> list[str]:
    """The VM's disk is whole where its record says, and (once the source let go)
    nowhere else."""
    name = job.details["name"]
    owner = client.hget(keys.vm_record(name), "host")
    relative = Path(name) / "d.img"
    if owner not in HOSTS:
        return [f"move {job.task.id}: the record of {name} names {owner!r}"]
    disk = campaign.root(owner) / relative
    if not disk.exists() or digest(disk) != job.details["digest"]:
        return [f"move {job.task.id} ({job.task.result}): {name}'s disk is not whole on "
                f"{owner}, which its record names"]
    others = [h for h in HOSTS if h != owner]
    try:
        wait_until(lambda: not any((campaign.root(h) / relative).exists() for h in others),
                   30, "the other host to let go")
    except TimeoutError:
        return [f"move {job.task.id} ({job.task.result}): {name}'s disk is also on "
                f"{[h for h in others if (campaign.root(h) / relative).exists()]}"]
    return []


def story(campaign: Campaign, job: Job, client: Any) -> str:
    """What a failure's diagnosis needs: the record's times, the faults around it,
    and what the workers logged of the task (its tmp_path may be gone by then)."""
    record = client.hgetall(keys.task_record(job.task.id))
    started = float(record.get("started") or job.submitted)
    finished = float(record.get("finished") or time.time())
    faults = [f"{at - job.submitted:+.1f} s {kind} {what}"
              for at, kind, what in campaign.faults
              if job.submitted - 10 <= at <= finished + 1]
    logged = [f"{path.name}: {line[:240]}" for path in sorted(campaign.base.glob("worker-*.log"))
              for line in path.read_text(errors="replace").splitlines()
              if job.task.id in line][:15]
    return (f"  {job.task.id}: submitted at 0, started {started - job.submitted:+.1f} s, "
            f"finished {finished - job.submitted:+.1f} s, worker {record.get('worker')}, "
            f"runs {record.get('runs')}\n  faults: {faults}\n  " + "\n  ".join(logged))


def check_guest(campaign: Campaign, server: VirtualServer) -> list[str]:
    """The guest runs in one QEMU, on the host its record names, whole."""
    assert campaign.vm is not None
    vm = server.find_virtual_machine(campaign.vm)
    assert vm is not None

    def settled() -> bool:
        return vm.state in (VMVMState.Running, VMVMState.Paused)

    try:
        wait_until(settled, 60, "the guest's host to reconcile it")
    except TimeoutError:
        return [f"guest {campaign.vm} reads {vm.state.name} on {vm.host} at the end"]

    def qemus() -> dict[str, list[int]]:
        return {h: pids_of(f"{campaign.root(h)}/vms/{campaign.vm}/") for h in HOSTS}

    try:
        wait_until(lambda: [h for h, pids in qemus().items() if pids] == [vm.host], 60,
                   "one QEMU, on the host the record names")
    except TimeoutError:
        return [f"guest {campaign.vm}: the record names {vm.host}, QEMUs {qemus()}"]
    disk = campaign.root(vm.host) / campaign.vm / "d.qcow2"
    check = subprocess.run(["qemu-img", "check", "-U", str(disk)], capture_output=True,
                           text=True)
    if check.returncode != 0:
        return [f"guest {campaign.vm}'s disk on {vm.host}: {check.stdout}{check.stderr}"]
    return []


def run_campaign(campaign: Campaign, seconds: float) -> None:
    print(f"\nfault campaign: seed {campaign.seed} ({seconds:.0f} s of faults); replay "
          f"with CAMPAIGN_SEED={campaign.seed}")
    began = time.monotonic()
    copies = VirtualServer(campaign.redis.url, host=HOSTS[0], poll_interval=0.5)
    # Each thread draws from its own stream of the seed: the workload's choices and
    # the faults' replay alike whatever the other thread did (their timing does not).
    fault_campaign = Campaign(campaign.seed, random.Random(f"{campaign.seed}-faults"),
                              campaign.redis, campaign.workers, campaign.start_worker,
                              campaign.base, campaign.jobs, campaign.faults,
                              stop=campaign.stop, lock=campaign.lock)
    workload = threading.Thread(target=campaign.workload, name="workload")
    faults = threading.Thread(target=fault_campaign.inject, args=(copies,), name="faults")
    workload.start()
    faults.start()
    campaign.stop.wait(seconds)
    campaign.stop.set()
    workload.join(120)
    faults.join(120)
    copies.close()
    assert not workload.is_alive() and not faults.is_alive(), "the campaign's threads hang"
    ended_faults = time.monotonic()
    with VirtualServer(campaign.redis.url, host=HOSTS[0], poll_interval=0.5) as server:
        client = server.redis
        deadline = time.monotonic() + DRAIN_SECONDS
        never: list[str] = []
        lost: list[str] = []
        for job in campaign.jobs:
            try:
                job.task = server.get_task(job.task.id)  # the workload's producer is closed
                if not job.task.wait_for_completion(
                        max(1, int((deadline - time.monotonic()) * 1000))):
                    snap = job.task.snapshot()
                    never.append(f"{job.kind} {job.task.id} on {job.host}: {snap.state}")
            except errors.TaskNotFoundError:
                if redis_killed_near(campaign, job.submitted):
                    lost.append(job.task.id)  # its submission was in AOF's lost second
                else:
                    never.append(f"{job.kind} {job.task.id}: record gone")
        drained = time.monotonic() - ended_faults
        problems = [*campaign.problems, *(f"never ended: {n}" for n in never)]
        for job in campaign.jobs:
            if job.task.id in lost or any(job.task.id in n for n in never):
                continue
            if wrong := check_job(campaign, job, client):
                problems += [*wrong, story(campaign, job, client)]
        # Every record in Redis, also those whose submit raised, ended and ran once.
        for key in client.scan_iter(keys.task_record("*")):
            state, runs = client.hmget(key, "state", "runs")
            if state in ("PENDING", "STARTED"):
                problems.append(f"{key} still {state}")
            if int(runs or 0) > 1:
                problems.append(f"{key} ran {runs} times")
        if campaign.vm is not None:
            problems += check_guest(campaign, server)
        for host in HOSTS:
            left = [str(p) for p in campaign.root(host).rglob("*.vmtask-*.tmp")]
            if left:
                problems.append(f"temporaries left on {host}: {left}")
        results = collections.Counter(
            f"{j.kind}:{getattr(j.task.result, 'name', None)}" for j in campaign.jobs
            if j.task.id not in lost and not any(j.task.id in n for n in never))
    kinds = collections.Counter(kind for _, kind, _ in campaign.faults)
    print(f"fault campaign: seed {campaign.seed}: {len(campaign.jobs)} tasks, faults "
          f"{dict(kinds)}, refused at submit {dict(campaign.refused)}, lost with a Redis "
          f"kill -9 {len(lost)}, drained {drained:.0f} s after the faults, "
          f"{time.monotonic() - began:.0f} s in all\nresults {dict(sorted(results.items()))}")
    assert not problems, f"seed {campaign.seed} (CAMPAIGN_SEED={campaign.seed}):\n" + (
        "\n".join(problems))


def prepare(spawn: Callable[..., Any], tmp_path: Path, *, live: bool) -> Campaign:
    redis = spawn("redis", appendonly=True)
    seed = seed_of()

    def start_worker(host: str) -> WorkerProcess:
        return WorkerProcess(redis.url, host, tmp_path / f"storage-{host}", tmp_path,
                             concurrency=2, env=ENV).start()

    workers = {host: spawn("worker", redis_url=redis.url, host=host, concurrency=2, env=ENV)
               for host in HOSTS}
    for host, worker in workers.items():
        source = worker.storage_root / "src" / f"{host}.img"
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_bytes(random.Random(f"{seed}-{host}").randbytes(8 * MiB))
    campaign = Campaign(seed, random.Random(seed), redis, workers, start_worker, tmp_path)
    if live:
        campaign.vm = start_guest(redis, workers)
    return campaign


def start_guest(redis: RedisServer, workers: dict[str, WorkerProcess]) -> str:
    """A running tiny guest (TCG) on the first host, for live migrations and pauses."""
    guest = build_tiny_guest()
    for worker in workers.values():
        (worker.storage_root / "guest").mkdir(parents=True, exist_ok=True)
        shutil.copy(guest.kernel, worker.storage_root / "guest" / "vmlinuz")
        shutil.copy(guest.initrd, worker.storage_root / "guest" / "initrd.gz")
    name = "lvm"
    with VirtualServer(redis.url, host=HOSTS[0], poll_interval=0.5) as server:
        created = server.create_dynamic_virtual_hard_disk(f"{name}/d.qcow2", 32)
        assert created.wait_for_completion(60_000) and created.result is VMTaskResult.Success
        qemu_io(workers[HOSTS[0]].storage_root / name / "d.qcow2", "qcow2",
                "write -P 0x5a 1M 4M")
        vm: VirtualMachine = server.create_virtual_machine(
            name, memory_mb=96, disks=[f"{name}/d.qcow2"], network=None,
            kernel="guest/vmlinuz", initrd="guest/initrd.gz",
            append="console=ttyS0 quiet panic=-1")
        started = vm.startup()
        assert started.wait_for_completion(120_000) and started.result is VMTaskResult.Success
    return name


def finish(campaign: Campaign) -> None:
    """Stop every worker the campaign started in place of a killed one, and the
    guest's QEMU (it outlives its worker)."""
    for worker in campaign.workers.values():
        worker.stop()
    for host in HOSTS:
        for pid in pids_of(f"{campaign.root(host)}/vms/"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_short_seeded_fault_campaign(spawn: Callable[..., Any], tmp_path: Path) -> None:
    campaign = prepare(spawn, tmp_path, live=os.environ.get("CAMPAIGN_LIVE") == "1")
    try:
        run_campaign(campaign, float(os.environ.get("CAMPAIGN_SECONDS", "25")))
    finally:
        finish(campaign)


@pytest.mark.campaign
def test_a_long_fault_campaign(spawn: Callable[..., Any], tmp_path: Path) -> None:
    campaign = prepare(spawn, tmp_path, live=os.environ.get("CAMPAIGN_LIVE") != "0")
    try:
        run_campaign(campaign, float(os.environ.get("CAMPAIGN_LONG_SECONDS", "240")))
    finally:
        finish(campaign)
