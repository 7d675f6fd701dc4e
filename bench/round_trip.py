"""No-op round trip, one task at a time: ``ping(0)`` + ``wait_for_completion(-1)``
against bare Celery's ``send_task("bare.noop")`` + ``.get()`` on its own worker.

BENCH_ROUNDS rounds (default 10) of BENCH_RT_TASKS sequential tasks per side,
alternating which side goes first.  Target: median per-round ratio <= 1.1x.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    ROUNDS,
    Cost,
    alternate,
    cpu_line,
    meter_for,
    ratio,
    record_row,
    stack,
    verdict,
)

N = int(os.environ.get("BENCH_RT_TASKS", "100"))
TARGET = 1.1


def main() -> None:
    with stack() as s:
        server, bare = s.server, s.bare_client
        ours_meter, bare_meter = meter_for(s, "vmtask"), meter_for(s, "bare")

        def vmtask_side() -> Cost:
            def run() -> None:
                for _ in range(N):
                    assert server.ping().wait_for_completion(-1)
            return ours_meter.run(N, run)

        def bare_side() -> Cost:
            def run() -> None:
                for _ in range(N):
                    bare.send_task("bare.noop").get(timeout=30)
            return bare_meter.run(N, run)

        alternate(1, {"vmtask": vmtask_side, "bare": bare_side})  # warm-up
        results = alternate(ROUNDS, {"vmtask": vmtask_side, "bare": bare_side})
    ours, base = results["vmtask"], results["bare"]
    r = ratio(ours, base, lambda c: c.per_task)
    o_ms = statistics.median(c.per_task for c in ours) * 1000
    b_ms = statistics.median(c.per_task for c in base) * 1000
    met = r.median <= TARGET
    print(f"No-op round trip, {N} sequential tasks x {ROUNDS} alternating rounds:")
    print(f"  vmtask ping(0)+wait        {o_ms:6.2f} ms/task  {cpu_line(ours)}")
    print(f"  bare Celery send_task+get  {b_ms:6.2f} ms/task  {cpu_line(base)}")
    print(f"ratio vmtask / bare: {r}  target <= {TARGET}x: {verdict(met)}")
    record_row("round trip, no-op, sequential", f"{o_ms:.2f} ms", f"{b_ms:.2f} ms", str(r),
               f"<= {TARGET}x", met)


if __name__ == "__main__":
    main()
