"""Save and restore of a 256 MB VM through the queue, against the same steps done
directly over QMP (workers.engines.qemu_vm with no queue), in one run.

Both VMs are identical and idle (no OS), on the same storage.  BENCH_ROUNDS rounds
(default 10) of one save and one restore per side, alternating which side goes
first.  Prints median times, the median of per-round ratios, and the target:
queued <= 1.2x direct + 50 ms.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("VMTASK_ACCEL", "tcg")

from api import VirtualServer, VMTaskResult
from bench.common import ROUNDS, record_row, verdict
from workers.devtools.sandbox import RedisServer, WorkerProcess
from workers.engines import qemu_vm
from workers.engines.context import NullContext

MEMORY_MB = 256


def timed(action: object) -> float:
    started = time.perf_counter()
    action()  # type: ignore[operator]
    return time.perf_counter() - started


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="vmb-", dir="/tmp") as t:
        tmp = Path(t)
        redis = RedisServer(tmp / "redis").start()
        worker = WorkerProcess(redis.url, "bench", tmp / "q", tmp, concurrency=1, include=())
        config = qemu_vm.VMConfig(name="direct", memory_mb=MEMORY_MB, accel="tcg")
        paths = qemu_vm.VMPaths.for_vm(tmp / "d", "direct")
        paths.directory.mkdir(parents=True)
        results: dict[str, list[float]] = {"direct save": [], "direct restore": [],
                                           "queued save": [], "queued restore": []}
        try:
            worker.start()
            server = VirtualServer(redis.url, host="bench", poll_interval=0.5)
            vm = server.create_virtual_machine("queued", memory_mb=MEMORY_MB)

            def run(task_factory: object) -> None:
                task = task_factory()  # type: ignore[operator]
                assert task.wait_for_completion(-1)
                assert task.result is VMTaskResult.Success, task.error_description

            run(vm.startup)
            qemu_vm.start(config, paths, NullContext())

            def direct_round() -> None:
                results["direct save"].append(
                    timed(lambda: qemu_vm.save(config, paths, NullContext())))
                results["direct restore"].append(timed(lambda: qemu_vm.start(
                    config, paths, NullContext(), incoming_state=paths.state_file)))

            def queued_round() -> None:
                results["queued save"].append(timed(lambda: run(vm.save)))
                results["queued restore"].append(timed(lambda: run(vm.startup)))

            for n in range(ROUNDS):
                first, second = (direct_round, queued_round) if n % 2 == 0 else (
                    queued_round, direct_round)
                first()
                second()
            run(vm.turn_off)
            run(vm.delete)
        finally:
            qemu_vm.turn_off(paths)
            worker.stop()
            redis.stop()
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"{MEMORY_MB} MB idle VM under TCG, median of {ROUNDS} alternating rounds:")
    for key in ("save", "restore"):
        d, q = med[f"direct {key}"], med[f"queued {key}"]
        limit = 1.2 * d + 0.05
        ratios = [b / a for a, b in zip(results[f"direct {key}"], results[f"queued {key}"],
                                        strict=True)]
        r = statistics.median(ratios)
        met = q <= limit
        print(f"  {key:8} direct {d * 1000:7.1f} ms   queued {q * 1000:7.1f} ms   "
              f"ratio {r:5.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f})   "
              f"queued - (1.2x direct + 50 ms) = {(q - limit) * 1000:+7.1f} ms  ({verdict(met)})")
        record_row(f"{key} of a {MEMORY_MB} MB VM", f"{q * 1000:.0f} ms",
                   f"direct QMP {d * 1000:.0f} ms",
                   f"{r:.2f}x ({min(ratios):.2f}-{max(ratios):.2f})",
                   "<= 1.2x + 50 ms", met)

if __name__ == "__main__":
    main()
