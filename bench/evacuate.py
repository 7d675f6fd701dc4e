"""Host evacuation (a composite task) against the same moves started by hand, two at a
time, in one run; and how fast a cancel of an evacuation cascades.

Three workers on one machine: source ``a``, destinations ``b`` and ``c``.  Four tiny
guests live on ``a`` (TCG, 96 MB of RAM, a qcow2 disk of BENCH_EVACUATE_DATA_MB of
data, default 48): two running, two turned off.  A round either evacuates ``a``
(``evacuate_host(max_parallel=2)``) or moves the same VMs to the same destinations
by hand, starting the next move as soon as one of the two running ends; rounds
alternate, the VMs going back to ``a`` untimed in between.  Prints the median
makespan of each and the median of per-pair ratios (target <= 1.2x).

Then the cascade: an evacuation is cancelled while its first two moves (the live
ones) run; the time from ``cancel()`` until every child that was cancellable is
complete (target <= 2 s), and until the parent is.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("VMTASK_ACCEL", "tcg")

from api import VirtualServer, VMTaskResult
from api.task import VMTask
from bench.common import record_row, verdict
from workers.devtools.sandbox import RedisServer, WorkerProcess, wait_until
from workers.devtools.tinyguest import build_tiny_guest
from workers.engines import qemu_vm
from workers.engines.qemu_vm.process import force_stop

ROUNDS = max(1, int(os.environ.get("BENCH_EVACUATE_ROUNDS", "3")))
DATA_MB = int(os.environ.get("BENCH_EVACUATE_DATA_MB", "48"))
# The moves run at a bounded rate, so the cancel lands mid-transfer.
ENV = {"VMTASK_HEARTBEAT_SECONDS": "1", "VMTASK_MIGRATE_MAX_BANDWIDTH": str(32 << 20)}
VMS = {"e1-run": True, "e2-run": True, "e3-off": False, "e4-off": False}
APPEND = "console=ttyS0 quiet panic=-1"


def add_guest(root: Path) -> None:
    guest = build_tiny_guest()
    (root / "guest").mkdir(parents=True, exist_ok=True)
    shutil.copy(guest.kernel, root / "guest" / "vmlinuz")
    shutil.copy(guest.initrd, root / "guest" / "initrd.gz")


def succeeded(task: VMTask) -> None:
    assert task.wait_for_completion(-1)
    snap = task.snapshot()
    assert snap.result is VMTaskResult.Success, (snap.description, snap.error_description)


def home(server: VirtualServer) -> None:
    """Every VM back on ``a``, untimed."""
    server.set_maintenance("a", False)
    tasks = []
    for name in VMS:
        vm = server.find_virtual_machine(name)
        assert vm is not None
        if vm.host != "a":
            tasks.append(vm.migrate("a"))
    for task in tasks:
        succeeded(task)


def by_hand(server: VirtualServer, plan: dict[str, str]) -> float:
    """The same moves, two at a time, each started as soon as a slot frees."""
    started = time.perf_counter()
    waiting = list(plan.items())
    running: list[VMTask] = []
    while waiting or running:
        while waiting and len(running) < 2:
            name, target = waiting.pop(0)
            vm = server.find_virtual_machine(name)
            assert vm is not None
            running.append(vm.migrate(target))
        # An eager client: it reads both moves every 50 ms (the parent reads every 200).
        snaps = server.task_snapshots([t.id for t in running])
        ended = [t for t, s in zip(running, snaps, strict=True) if s is not None and s.is_complete]
        for task in ended:
            succeeded(task)
            running.remove(task)
        if not ended:
            time.sleep(0.05)
    return time.perf_counter() - started


def evacuation(server: VirtualServer) -> tuple[float, dict[str, str]]:
    started = time.perf_counter()
    task = server.evacuate_host("a", max_parallel=2)
    succeeded(task)
    elapsed = time.perf_counter() - started
    output = task.snapshot().output
    assert output["failed"] == {}, output
    return elapsed, dict(output["moved"])


def cascade(server: VirtualServer) -> tuple[float, float, int]:
    """Seconds from cancel() until every cancellable child ended, and the parent."""
    task = server.evacuate_host("a", max_parallel=2)
    wait_until(lambda: sum(1 for c in task.children
                           if c.snapshot().percent_completed >= 2) >= 2, 120,
               "two moves under way")
    children = task.children
    cancelled_at = time.time()
    task.cancel()
    assert task.wait_for_completion(60_000)
    parent_done = (task.snapshot().finished or time.time()) - cancelled_at
    snaps = [c.snapshot() for c in children]
    stopped = [s for s in snaps if s.result is VMTaskResult.Cancelled]
    assert task.result is VMTaskResult.Cancelled, task.error_description
    last = max(((s.finished or cancelled_at) - cancelled_at for s in stopped), default=0.0)
    return last, parent_done, len(stopped)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="vme-", dir="/tmp") as t:
        tmp = Path(t)
        redis = RedisServer(tmp / "redis").start()
        workers = [WorkerProcess(redis.url, host, tmp / host, tmp, concurrency=3, include=(),
                                 env=ENV) for host in ("a", "b", "c")]
        times: dict[str, list[float]] = {"evacuate": [], "hand": []}
        try:
            for worker in workers:
                worker.start(wait=False)
                add_guest(worker.storage_root)
            for worker in workers:
                worker.wait_ready()
            server = VirtualServer(redis.url, host="a", poll_interval=0.2)
            wait_until(lambda: len(server.hosts) == 3, 30, "three hosts")
            for name, running in VMS.items():
                disk = tmp / "a" / name / "d.qcow2"
                disk.parent.mkdir(parents=True)
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "256M"],
                               check=True)
                subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {DATA_MB}M",
                                str(disk)], check=True, capture_output=True)
                vm = server.create_virtual_machine(
                    name, memory_mb=96, disks=[f"{name}/d.qcow2"], network=None, host="a",
                    kernel="guest/vmlinuz", initrd="guest/initrd.gz", append=APPEND)
                if running:
                    succeeded(vm.startup())
            time.sleep(3)  # the guests past their boot
            plan: dict[str, str] = {}
            for n in range(ROUNDS):
                order = ("evacuate", "hand") if n % 2 == 0 else ("hand", "evacuate")
                for kind in order:
                    if kind == "evacuate":
                        elapsed, plan = evacuation(server)
                    else:  # round 0 starts with the evacuation, whose plan this follows
                        elapsed = by_hand(server, plan)
                    times[kind].append(elapsed)
                    home(server)
            cancel_children, cancel_parent, stopped = cascade(server)
        finally:
            for worker in workers:
                worker.stop()
                for name in VMS:
                    force_stop(qemu_vm.VMPaths.for_vm(worker.storage_root, name))
            redis.stop()
    ratios = [e / h for e, h in zip(times["evacuate"], times["hand"], strict=True)]
    r = statistics.median(ratios)
    e, h = statistics.median(times["evacuate"]), statistics.median(times["hand"])
    print(f"4 tiny guests (2 running, 2 off; {DATA_MB} MB of data each), a -> b, c, "
          f"median of {ROUNDS} alternating rounds:")
    print(f"  makespan  by hand {h:6.2f} s   evacuate_host {e:6.2f} s   ratio {r:5.2f}x "
          f"(rounds {min(ratios):.2f}-{max(ratios):.2f})  target <= 1.2x ({verdict(r <= 1.2)})")
    print(f"  cascade cancel: {stopped} running move(s) cancelled, the last complete "
          f"{cancel_children:.2f} s after cancel(), the parent {cancel_parent:.2f} s  "
          f"target <= 2 s ({verdict(cancel_children <= 2)})")
    record_row("evacuation of 4 tiny guests, max_parallel=2", f"{e:.2f} s",
               f"by hand 2 at a time {h:.2f} s",
               f"{r:.2f}x ({min(ratios):.2f}-{max(ratios):.2f})", "<= 1.2x", r <= 1.2)
    record_row("evacuation cascade cancel", f"{cancel_children:.2f} s",
               f"parent {cancel_parent:.2f} s", "", "<= 2 s", cancel_children <= 2)


if __name__ == "__main__":
    main()
