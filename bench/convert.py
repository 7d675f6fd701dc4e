"""A 1 GiB convert through the queue against the same qemu-img convert run directly.

Same source file, same machine, same run; rounds alternate so drift hits both.
The source is full of non-zero data (written once), so qemu-img really copies.
Files live in /dev/shm when it exists: on a disk, page-cache writeback made single
runs vary 5x (0.3 s to 1.9 s) and drowned the queue's own cost, which is what this
measures.  Set BENCH_DIR to measure on a real disk instead.
Prints the median times and the ratio; target: queued <= 1.05x direct.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api import VirtualServer, VMHardDiskType, VMTaskResult
from workers.devtools.sandbox import RedisServer, WorkerProcess

MiB = 1 << 20
SIZE_MB = int(os.environ.get("BENCH_CONVERT_MB", "1024"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "7"))


def main() -> None:
    import tempfile

    default_dir = "/dev/shm" if Path("/dev/shm").is_dir() else None
    bench_dir = os.environ.get("BENCH_DIR", default_dir)
    with tempfile.TemporaryDirectory(prefix="vmtask-bench-", dir=bench_dir) as t:
        tmp = Path(t)
        storage = tmp / "storage"
        storage.mkdir()
        source = storage / "source.img"
        block = os.urandom(MiB)
        with source.open("wb") as f:
            for _ in range(SIZE_MB):
                f.write(block)
        redis = RedisServer(tmp / "redis").start()
        worker = WorkerProcess(redis.url, "bench", storage, tmp, concurrency=1, include=())
        direct: list[float] = []
        queued: list[float] = []
        try:
            worker.start()
            server = VirtualServer(redis.url, host="bench", poll_interval=0.5)
            disk = server.get_hard_disk("source.img")
            def run_direct(n: int) -> None:
                out = storage / f"direct{n}.qcow2"
                os.sync()  # start each run with no dirty pages from the last one
                started = time.perf_counter()
                subprocess.run(["qemu-img", "convert", "-p", "-f", "raw", "-O", "qcow2",
                                str(source), str(out)], check=True, capture_output=True)
                # vmtask fsyncs an output before its atomic rename (so a crash never
                # publishes a half-written image); the fair baseline does the same.
                fd = os.open(out, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
                direct.append(time.perf_counter() - started)
                out.unlink()

            def run_queued(n: int) -> None:
                os.sync()
                started = time.perf_counter()
                task = disk.convert(f"queued{n}.qcow2", VMHardDiskType.Dynamic)
                assert task.wait_for_completion(-1)
                queued.append(time.perf_counter() - started)
                assert task.result is VMTaskResult.Success, task.error_description
                (storage / f"queued{n}.qcow2").unlink()

            for n in range(ROUNDS):
                # Alternate who goes first, so neither always meets a warmer cache.
                first, second = (run_direct, run_queued) if n % 2 else (run_queued, run_direct)
                first(n)
                second(n)
        finally:
            worker.stop()
            redis.stop()
    d, q = statistics.median(direct), statistics.median(queued)
    print(f"{SIZE_MB} MiB raw -> qcow2 convert, median of {ROUNDS}:")
    print(f"  direct qemu-img convert + fsync   {d:7.3f} s")
    print(f"  through vmtask's queue            {q:7.3f} s")
    print(f"  samples: direct {[round(x, 2) for x in direct]}")
    print(f"           queued {[round(x, 2) for x in queued]}")
    print(f"ratio queued / direct: {q / d:5.3f}x  (target <= 1.05)")


if __name__ == "__main__":
    main()
