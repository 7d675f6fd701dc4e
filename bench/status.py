"""Status of BENCH_STATUS_TASKS (default 1,000) finished tasks in one call:
``server.task_snapshots(ids)``, against the floor, a raw redis-py pipeline reading
the same keys (each record's hash and lease) in one round trip.

BENCH_ROUNDS rounds (default 10), alternating.  Target: task_snapshots <= 50 ms.
Where ``task_snapshots`` does not exist yet, it says so and measures reading the
tasks one by one (``get_task(id).snapshot()``), the only public way today.
"""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.protocol import keys
from bench.common import ROUNDS, Cost, alternate, meter_for, record_row, stack, verdict

N = int(os.environ.get("BENCH_STATUS_TASKS", "1000"))
TARGET_MS = 50.0


def main() -> None:
    with stack(bare=False) as s:
        server, client = s.server, s.client()
        tasks = [server.ping() for _ in range(N)]
        for task in tasks:
            assert task.wait_for_completion(-1)
        ids = [task.id for task in tasks]
        meter = meter_for(s, "vmtask")
        batch: Callable[[list[str]], list[object]] | None = getattr(
            server, "task_snapshots", None)

        def vmtask_side() -> Cost:
            def run() -> None:
                if batch is not None:
                    snaps = batch(ids)
                else:
                    snaps = [server.get_task(task_id).snapshot() for task_id in ids]
                assert len(snaps) == N and all(snap is not None for snap in snaps)
            return meter.run(1, run)

        def floor_side() -> Cost:
            def run() -> None:
                pipe = client.pipeline(transaction=False)
                for task_id in ids:
                    pipe.hgetall(keys.task_record(task_id))
                    pipe.exists(keys.task_lease(task_id))
                assert len(pipe.execute()) == 2 * N
            return meter.run(1, run)

        alternate(1, {"vmtask": vmtask_side, "floor": floor_side})  # warm-up
        results = alternate(ROUNDS, {"vmtask": vmtask_side, "floor": floor_side})
    ours, base = results["vmtask"], results["floor"]
    o = statistics.median(c.wall for c in ours) * 1000
    b = statistics.median(c.wall for c in base) * 1000
    o_cpu = statistics.median(c.producer_cpu for c in ours) * 1000
    b_cpu = statistics.median(c.producer_cpu for c in base) * 1000
    how = "server.task_snapshots(ids)" if batch is not None else (
        "one by one (task_snapshots not available)")
    ratios = [x.wall / y.wall for x, y in zip(ours, base, strict=True)]
    met = batch is not None and o <= TARGET_MS
    print(f"Status of {N} finished tasks, {ROUNDS} alternating rounds (median):")
    print(f"  vmtask {how:42} {o:8.1f} ms  (producer CPU {o_cpu:.1f} ms, "
          f"rounds {min(c.wall for c in ours) * 1000:.1f}-{max(c.wall for c in ours) * 1000:.1f})")
    print(f"  raw pipelined HGETALL+EXISTS (the floor)  {b:8.1f} ms  (producer CPU {b_cpu:.1f} ms)")
    print(f"ratio vmtask / floor: {statistics.median(ratios):.2f}x; target <= {TARGET_MS:g} ms: "
          f"{verdict(met)}" + ("" if batch is not None else " (task_snapshots not available)"))
    record_row(f"status of {N:,} tasks" + ("" if batch else " (one by one: no task_snapshots)"),
               f"{o:.1f} ms", f"raw pipeline {b:.1f} ms",
               f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})",
               f"<= {TARGET_MS:g} ms", met)


if __name__ == "__main__":
    main()
