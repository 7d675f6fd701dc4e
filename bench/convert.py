"""The fixed cost of an operation: a small raw -> qcow2 convert (BENCH_CONVERT_MB,
default 1 MiB of random data) three ways, in one run:

- direct: ``qemu-img convert`` with vmtask's argv, then the same fsyncs and rename
  (`bench.bare_app.convert_file`), in this process;
- bare Celery: the same function as the task ``bare.convert`` on its own worker;
- vmtask: ``disk.convert(...)`` + ``wait_for_completion(-1)``.

BENCH_CONVERT_PER_ROUND converts (default 5) per side per round, BENCH_ROUNDS rounds
(default 10), rotating which side goes first.  Files live in /dev/shm when it exists
(so page-cache writeback does not drown the cost measured); BENCH_DIR overrides.
Target: vmtask adds <= 10 ms to the direct convert (median of per-round differences).
"""

from __future__ import annotations

import os
import statistics
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api import VMHardDiskType, VMTaskResult
from bench.bare_app import convert_file
from bench.common import (
    ROUNDS,
    Cost,
    Meter,
    alternate,
    cpu_line,
    meter_for,
    ratio,
    record_row,
    stack,
    verdict,
)

MiB = 1 << 20
SIZE_MB = int(os.environ.get("BENCH_CONVERT_MB", "1"))
PER_ROUND = int(os.environ.get("BENCH_CONVERT_PER_ROUND", "5"))
TARGET_MS = 10.0


def main() -> None:
    default_dir = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with stack(directory=os.environ.get("BENCH_DIR", default_dir)) as s:
        source = s.storage / "source.img"
        with source.open("wb") as f:
            for _ in range(SIZE_MB):
                f.write(os.urandom(MiB))
        disk = s.server.get_hard_disk("source.img")
        bare = s.bare_client

        def side(meter: Meter, convert_one: object) -> Cost:
            names = [f"{uuid.uuid4().hex[:8]}.qcow2" for _ in range(PER_ROUND)]

            def run() -> None:
                for name in names:
                    convert_one(name)  # type: ignore[operator]
            cost = meter.run(PER_ROUND, run)
            for name in names:
                (s.storage / name).unlink()  # outside the measured time
            return cost

        def vmtask_one(name: str) -> None:
            task = disk.convert(name, VMHardDiskType.Dynamic)
            assert task.wait_for_completion(-1)
            assert task.result is VMTaskResult.Success, task.error_description

        def bare_one(name: str) -> None:
            bare.send_task("bare.convert", args=[str(source), str(s.storage / name)]).get(
                timeout=120)

        def direct_one(name: str) -> None:
            convert_file(str(source), str(s.storage / name))

        sides = {
            "vmtask": lambda: side(meter_for(s, "vmtask"), vmtask_one),
            "bare": lambda: side(meter_for(s, "bare"), bare_one),
            "direct": lambda: side(meter_for(s, "none"), direct_one),
        }
        alternate(1, sides)  # warm-up
        results = alternate(ROUNDS, sides)
    ours, base, direct = results["vmtask"], results["bare"], results["direct"]

    def ms(costs: list[Cost]) -> float:
        return statistics.median(c.per_task for c in costs) * 1000

    added = [(o.per_task - d.per_task) * 1000 for o, d in zip(ours, direct, strict=True)]
    bare_added = [(b.per_task - d.per_task) * 1000 for b, d in zip(base, direct, strict=True)]
    fixed = statistics.median(added)
    vs_direct = ratio(ours, direct, lambda c: c.per_task)
    vs_bare = ratio(ours, base, lambda c: c.per_task)
    met = fixed <= TARGET_MS
    print(f"{SIZE_MB} MiB raw -> qcow2 convert, {PER_ROUND} per side x {ROUNDS} rotating rounds:")
    print(f"  direct qemu-img + fsyncs     {ms(direct):7.1f} ms  {cpu_line(direct)}")
    print(f"  bare Celery bare.convert     {ms(base):7.1f} ms  {cpu_line(base)}")
    print(f"  vmtask disk.convert + wait   {ms(ours):7.1f} ms  {cpu_line(ours)}")
    print(f"added by vmtask over direct: median {fixed:+.1f} ms (rounds {min(added):+.1f} to "
          f"{max(added):+.1f}); target <= {TARGET_MS:g} ms: {verdict(met)}")
    print(f"  (bare Celery adds {statistics.median(bare_added):+.1f} ms over direct)")
    print(f"ratio vmtask / direct: {vs_direct};  vmtask / bare Celery: {vs_bare}")
    record_row(f"{SIZE_MB} MiB convert: time added over direct qemu-img", f"{ms(ours):.1f} ms",
               f"direct {ms(direct):.1f} ms", f"{vs_direct} (+{fixed:.1f} ms)",
               f"<= +{TARGET_MS:g} ms", met)
    record_row(f"{SIZE_MB} MiB convert vs bare Celery bare.convert", f"{ms(ours):.1f} ms",
               f"bare {ms(base):.1f} ms", str(vs_bare), "", None)


if __name__ == "__main__":
    main()
