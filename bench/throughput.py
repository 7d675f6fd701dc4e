"""No-op throughput: BENCH_TP_TASKS (default 500) submitted, then all waited for.

vmtask: ``ping()`` x N then ``wait_for_completion(-1)`` on each; bare Celery:
``send_task("bare.noop")`` x N then ``.get()`` on each, on its own worker.
BENCH_ROUNDS rounds (default 10), alternating which side goes first.
Target: median per-round ratio of rates >= 0.95x.
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

N = int(os.environ.get("BENCH_TP_TASKS", "500"))
TARGET = 0.95


def main() -> None:
    with stack() as s:
        server, bare = s.server, s.bare_client
        ours_meter, bare_meter = meter_for(s, "vmtask"), meter_for(s, "bare")

        def vmtask_side() -> Cost:
            def run() -> None:
                tasks = [server.ping() for _ in range(N)]
                for task in tasks:
                    assert task.wait_for_completion(-1)
            return ours_meter.run(N, run)

        def bare_side() -> Cost:
            def run() -> None:
                results = [bare.send_task("bare.noop") for _ in range(N)]
                for result in results:
                    result.get(timeout=120)
            return bare_meter.run(N, run)

        alternate(1, {"vmtask": vmtask_side, "bare": bare_side})  # warm-up
        results = alternate(ROUNDS, {"vmtask": vmtask_side, "bare": bare_side})
    ours, base = results["vmtask"], results["bare"]
    r = ratio(ours, base, lambda c: c.rate)
    o, b = statistics.median(c.rate for c in ours), statistics.median(c.rate for c in base)
    met = r.median >= TARGET
    print(f"No-op throughput, {N} submitted then waited x {ROUNDS} alternating rounds:")
    print(f"  vmtask ping()+wait         {o:7.1f} tasks/s  {cpu_line(ours)}")
    print(f"  bare Celery send_task+get  {b:7.1f} tasks/s  {cpu_line(base)}")
    print(f"ratio vmtask / bare: {r}  target >= {TARGET}x: {verdict(met)}")
    record_row(f"throughput, {N} submitted then waited", f"{o:.0f} tasks/s",
               f"{b:.0f} tasks/s", str(r), f">= {TARGET}x", met)


if __name__ == "__main__":
    main()
