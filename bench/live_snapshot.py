"""Live snapshots through the queue against the same steps over direct QMP, in one run.

1. A snapshot with memory of a running 256 MB VM (idle, no OS, one 512 MB qcow2
   disk): the guest's pause, ``paused_ms`` of `vm.create_snapshot`, against a
   direct QMP client doing the same steps (overlay opened by ``blockdev-add``,
   ``stop``, ``migrate`` to a file, ``transaction`` of ``blockdev-snapshot``,
   ``cont``) on an identical VM.  BENCH_ROUNDS rounds (default 10), alternating.
   Target: queued <= 1.2x direct.
2. A live delete of a snapshot holding 256 MB of changes (written through QEMU's
   own ``qemu-io`` HMP command): the task's wall time from submission to its end,
   against the direct ``block-stream`` of the same layer on the identical VM.  Once.
   Target: queued <= 1.2x direct.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("VMTASK_ACCEL", "tcg")

from api import VirtualServer, VMTaskResult
from bench.common import ROUNDS, record_row, verdict
from workers.devtools.sandbox import RedisServer, WorkerProcess
from workers.engines import qemu_vm
from workers.engines.context import NullContext
from workers.engines.qemu_vm import Monitor

MEMORY_MB = 256
DISK_MB = 512
CHANGES = "256M"
SNAPSHOTS = max(2, ROUNDS)  # the direct delete streams onto the next-to-last overlay


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def overlay(path: Path, parent: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", "-b", parent.name, "-F", "qcow2", str(path))


def top(monitor: Monitor) -> str:
    return str(monitor.execute("query-block")[0]["inserted"]["node-name"])


def direct_snapshot(monitor: Monitor, new: Path, node: str, state: Path) -> float:
    """libvirt's steps over plain QMP; returns how long the CPUs stood still (s)."""
    monitor.execute("blockdev-add", {"driver": "qcow2", "node-name": node, "backing": None,
                                     "file": {"driver": "file", "filename": str(new)}})
    fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        stopped = time.perf_counter()
        monitor.execute("stop")
        monitor.send_fd("bench", fd)
        monitor.execute("migrate", {"uri": "fd:bench"})
        while monitor.execute("query-migrate")["status"] != "completed":
            time.sleep(0.005)
        os.fsync(fd)
        monitor.execute("transaction", {"actions": [{"type": "blockdev-snapshot", "data": {
            "node": top(monitor), "overlay": node}}]})
        monitor.execute("cont")
        return time.perf_counter() - stopped
    finally:
        os.close(fd)


def wait_job(monitor: Monitor, job: str) -> None:
    while True:
        jobs = [j for j in monitor.execute("query-jobs") if j["id"] == job]
        if jobs and jobs[0]["status"] == "concluded":
            monitor.execute("job-dismiss", {"id": job})
            return
        time.sleep(0.01)


def run(task: Any) -> Any:
    assert task.wait_for_completion(-1)
    assert task.result is VMTaskResult.Success, task.error_description
    return task.snapshot().output


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="vls-", dir="/tmp") as t:
        tmp = Path(t)
        redis = RedisServer(tmp / "redis").start()
        worker = WorkerProcess(redis.url, "bench", tmp / "q", tmp, concurrency=1, include=())
        disks = tmp / "d" / "disks"
        disks.mkdir(parents=True)
        qemu_img("create", "-q", "-f", "qcow2", str(disks / "base.qcow2"), f"{DISK_MB}M")
        overlay(disks / "l0.qcow2", disks / "base.qcow2")
        # The queued VM's devices too (a VGA display and a VNC server, as the worker
        # gives every VM): QEMU's main loop, where block jobs run, serves them.
        config = qemu_vm.VMConfig(name="direct", memory_mb=MEMORY_MB, accel="tcg",
                                  disks=[str(disks / "l0.qcow2")], vga=True,
                                  vnc_listen="127.0.0.1")
        paths = qemu_vm.VMPaths.for_vm(tmp / "d", "direct")
        paths.directory.mkdir(parents=True, exist_ok=True)
        pauses: dict[str, list[float]] = {"direct": [], "queued": []}
        try:
            worker.start()
            server = VirtualServer(redis.url, host="bench", poll_interval=0.05)
            run(server.create_dynamic_virtual_hard_disk("qv/d.qcow2", DISK_MB))
            vm = server.create_virtual_machine("qv", memory_mb=MEMORY_MB,
                                               disks=["qv/d.qcow2"])
            run(vm.startup())
            qemu_vm.start(config, paths, NullContext())
            previous = disks / "l0.qcow2"
            for n in range(SNAPSHOTS):
                def direct(n: int = n) -> None:
                    nonlocal previous
                    new = disks / f"l{n + 1}.qcow2"
                    overlay(new, previous)
                    with qemu_vm.connect(paths) as monitor:
                        pauses["direct"].append(direct_snapshot(
                            monitor, new, f"n{n + 1}", tmp / f"state{n}"))
                    previous = new

                def queued(n: int = n) -> None:
                    output = run(vm.create_snapshot(f"s{n}", include_memory=True))
                    pauses["queued"].append(output["paused_ms"] / 1000)

                for side in ((direct, queued) if n % 2 == 0 else (queued, direct)):
                    side()
            # 2. Live delete of a point holding 256 MB of changes.
            vm_paths = qemu_vm.VMPaths.for_vm(tmp / "q", "qv")
            for where in (vm_paths, paths):
                with qemu_vm.connect(where) as monitor:
                    monitor.execute("human-monitor-command", {
                        "command-line": f"qemu-io disk0 \"write -P 0xab 0 {CHANGES}\""},
                        timeout=600)
            # Both sides' changes are written before either delete; the direct one
            # goes first, so the queued one does not start while the other's writes
            # are still being flushed.
            subprocess.run(["sync"], check=True)
            newest = disks / "top.qcow2"
            overlay(newest, previous)
            with qemu_vm.connect(paths) as monitor:
                monitor.execute("blockdev-add", {
                    "driver": "qcow2", "node-name": "ntop", "backing": None,
                    "file": {"driver": "file", "filename": str(newest)}})
                monitor.execute("transaction", {"actions": [{"type": "blockdev-snapshot",
                                "data": {"node": top(monitor), "overlay": "ntop"}}]})
                # The layer holding the changes (the last overlay) goes, onto the one below.
                below = disks / f"l{SNAPSHOTS - 1}.qcow2"
                started = time.perf_counter()
                monitor.execute("block-stream", {
                    "job-id": "bench", "device": "ntop", "base-node": f"n{SNAPSHOTS - 1}",
                    "backing-file": below.name, "auto-dismiss": False})
                wait_job(monitor, "bench")
                direct_delete = time.perf_counter() - started
            subprocess.run(["sync"], check=True)
            run(vm.create_snapshot("big", include_memory=False))
            started = time.perf_counter()
            deleting = vm.delete_snapshot("big")
            run(deleting)
            print("\n".join(deleting.log()))
            queued_delete = time.perf_counter() - started
            run(vm.turn_off())
        finally:
            qemu_vm.turn_off(paths)
            worker.stop()
            redis.stop()
    d, q = statistics.median(pauses["direct"]), statistics.median(pauses["queued"])
    ratios = [b / a for a, b in zip(pauses["direct"], pauses["queued"], strict=True)]
    r = statistics.median(ratios)
    met = r <= 1.2  # the median of the per-round ratios (the medians of times are shown too)
    print(f"snapshot with memory of a {MEMORY_MB} MB idle VM under TCG, median of {SNAPSHOTS} "
          f"alternating rounds: guest paused {q * 1000:.1f} ms queued, {d * 1000:.1f} ms "
          f"direct QMP; ratio {r:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) "
          f"({verdict(met)})")
    record_row(f"paused_ms, snapshot with memory of a {MEMORY_MB} MB VM", f"{q * 1000:.0f} ms",
               f"direct QMP {d * 1000:.0f} ms",
               f"{r:.2f}x ({min(ratios):.2f}-{max(ratios):.2f})", "<= 1.2x", met)
    r = queued_delete / direct_delete
    met = r <= 1.2
    print(f"live delete of a point holding {CHANGES}B of changes: {queued_delete:.2f} s "
          f"queued, direct block-stream {direct_delete:.2f} s; ratio {r:.2f}x "
          f"({verdict(met)})")
    record_row(f"live delete of a point holding {CHANGES}B of changes",
               f"{queued_delete:.2f} s", f"direct block-stream {direct_delete:.2f} s",
               f"{r:.2f}x", "<= 1.2x", met)


if __name__ == "__main__":
    main()
