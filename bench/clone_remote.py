"""A full clone onto another host against today's ``disk.copy_to`` of the same data
(issue 23), in one run.

Two workers (hosts ``a`` and ``b``, separate storage roots, /dev/shm when it exists;
BENCH_DIR overrides) on one machine.  The source VM on ``a`` has a qcow2 disk of
BENCH_CLONE_MB (default 512) filled with data, one snapshot over it and
BENCH_CLONE_TOP_MB (default 64) written in its present, so a chain of three images
flattens.  A round does ``vm.clone(..., host="b")`` (the present) and
``get_hard_disk(<the present's layer>).copy_to("b", ...)`` (the same chain, the same
bytes), the order alternating; each copy is deleted between rounds, untimed.
Throughput is the disk's virtual size over the time from submit to the task's end;
the ratio is the median of per-round clone/copy throughputs.  Target: >= 0.9.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api import VirtualServer, VMTask, VMTaskResult
from bench.common import ROUNDS, record_row, verdict
from workers.devtools.sandbox import RedisServer, WorkerProcess

DISK_MB = int(os.environ.get("BENCH_CLONE_MB", "512"))
TOP_MB = int(os.environ.get("BENCH_CLONE_TOP_MB", "64"))
TARGET = 0.9


def run(task: VMTask) -> dict[str, object]:
    assert task.wait_for_completion(-1)
    snap = task.snapshot()
    assert snap.result is VMTaskResult.Success, snap.error_description
    return snap.output or {}


def qemu_io(path: Path, command: str) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(path)], check=True,
                   capture_output=True)


def main() -> None:
    default_dir = "/dev/shm" if Path("/dev/shm").is_dir() else None
    base_dir = os.environ.get("BENCH_DIR", default_dir)
    with tempfile.TemporaryDirectory(prefix="vmclone-", dir=base_dir) as t:
        tmp = Path(t)
        redis = RedisServer(tmp / "redis", appendonly=True).start()
        workers = [WorkerProcess(redis.url, host, tmp / host, tmp, concurrency=2, include=())
                   for host in ("a", "b")]
        times: dict[str, list[float]] = {"clone": [], "copy": []}
        try:
            for worker in workers:
                worker.start(wait=False)
            for worker in workers:
                worker.wait_ready()
            server = VirtualServer(redis.url, host="a", poll_interval=0.05)
            run(server.create_dynamic_virtual_hard_disk("src/d.qcow2", DISK_MB))
            qemu_io(tmp / "a" / "src" / "d.qcow2", f"write -P 0x5a 0 {DISK_MB}M")
            vm = server.create_virtual_machine("src", memory_mb=64, disks=["src/d.qcow2"],
                                               network=None)
            run(vm.create_snapshot("s1"))
            folder = tmp / "a" / "vms" / "src" / "snapshots"
            layer = json.loads((folder / "tree.json").read_text())["present"]
            present = folder / f"{layer}-0.qcow2"
            qemu_io(present, f"write -P 0xa5 0 {TOP_MB}M")
            disk = server.get_hard_disk(str(present.relative_to(tmp / "a")))

            def clone_round(n: int) -> None:
                started = time.perf_counter()
                run(vm.clone(f"c{n}", host="b"))
                times["clone"].append(time.perf_counter() - started)
                clone = server.find_virtual_machine(f"c{n}")
                assert clone is not None
                run(clone.delete())

            def copy_round(n: int) -> None:
                started = time.perf_counter()
                run(disk.copy_to("b", f"copies/c{n}.qcow2"))
                times["copy"].append(time.perf_counter() - started)
                run(server.get_hard_disk(f"copies/c{n}.qcow2", host="b").delete())

            for n in range(ROUNDS):
                first, second = (clone_round, copy_round) if n % 2 == 0 else (
                    copy_round, clone_round)
                first(n)
                second(n)
            run(vm.delete())
        finally:
            for worker in workers:
                worker.stop()
            redis.stop()
    mb = DISK_MB
    ratios = [c / k for c, k in zip(times["copy"], times["clone"], strict=True)]
    r = statistics.median(ratios)
    clone_s, copy_s = statistics.median(times["clone"]), statistics.median(times["copy"])
    print(f"{mb} MB qcow2 disk full of data, one snapshot, {TOP_MB} MB in the present; "
          f"median of {ROUNDS} alternating rounds:")
    print(f"  clone to b  {clone_s * 1000:7.0f} ms  {mb / clone_s:7.0f} MB/s")
    print(f"  copy_to b   {copy_s * 1000:7.0f} ms  {mb / copy_s:7.0f} MB/s")
    print(f"  throughput ratio clone/copy {r:5.2f}x (rounds {min(ratios):.2f}-"
          f"{max(ratios):.2f})  target >= {TARGET}x ({verdict(r >= TARGET)})")
    record_row(f"full clone to another host, {mb} MB disk", f"{mb / clone_s:.0f} MB/s",
               f"copy_to {mb / copy_s:.0f} MB/s",
               f"{r:.2f}x ({min(ratios):.2f}-{max(ratios):.2f})", f">= {TARGET}x",
               r >= TARGET)


if __name__ == "__main__":
    main()
