"""Enqueue rate with no consumer: ``server.ping()`` against bare Celery's
``send_task("bare.noop")``.

Both workers run (vmtask's keeps its host heartbeat live, so submit sees a live
host) but neither consumes: their queue consumers are cancelled with
``control.cancel_consumer``.  Each round enqueues BENCH_ENQ_TASKS (default 1,000)
per side and checks that all of them are still queued; BENCH_ROUNDS rounds
(default 10), alternating.  Target: median per-round ratio of rates >= 0.9x.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.protocol import keys
from bench import bare_app
from bench.common import (
    HOST,
    ROUNDS,
    Cost,
    Stack,
    alternate,
    cpu_line,
    meter_for,
    ratio,
    record_row,
    stack,
    verdict,
    wait_until,
)

N = int(os.environ.get("BENCH_ENQ_TASKS", "1000"))
TARGET = 0.9


def stop_consuming(s: Stack) -> None:
    """Cancel both workers' queue consumers.  Every round then checks that all of its
    tasks are still queued, so a consumer left running fails the benchmark."""
    for queue in (keys.host_queue(HOST), keys.control_queue(HOST)):
        replies = s.server.celery.control.cancel_consumer(queue, reply=True, timeout=2)
        assert replies, f"no worker answered cancel_consumer({queue})"
    assert s.bare is not None
    assert s.bare_client.control.cancel_consumer(
        bare_app.QUEUE, destination=[s.bare.node], reply=True, timeout=2)
    wait_until(lambda: s.server.hosts, 5, "a live host")


def main() -> None:
    with stack() as s:
        server, bare = s.server, s.bare_client
        client = s.client()
        stop_consuming(s)
        ours_meter, bare_meter = meter_for(s, "vmtask"), meter_for(s, "bare")

        def vmtask_side() -> Cost:
            client.delete(keys.host_queue(HOST))
            cost = ours_meter.run(N, lambda: [server.ping() for _ in range(N)])
            assert client.llen(keys.host_queue(HOST)) == N
            return cost

        def bare_side() -> Cost:
            client.delete(bare_app.QUEUE)
            cost = bare_meter.run(N, lambda: [bare.send_task("bare.noop") for _ in range(N)])
            assert client.llen(bare_app.QUEUE) == N
            return cost

        alternate(1, {"vmtask": vmtask_side, "bare": bare_side})  # warm-up
        results = alternate(ROUNDS, {"vmtask": vmtask_side, "bare": bare_side})
    ours, base = results["vmtask"], results["bare"]
    r = ratio(ours, base, lambda c: c.rate)
    o, b = statistics.median(c.rate for c in ours), statistics.median(c.rate for c in base)
    met = r.median >= TARGET
    print(f"Enqueue rate with no consumer, {N} tasks x {ROUNDS} alternating rounds:")
    print(f"  vmtask ping()              {o:7.1f} tasks/s  {cpu_line(ours)}")
    print(f"  bare Celery send_task      {b:7.1f} tasks/s  {cpu_line(base)}")
    print(f"ratio vmtask / bare: {r}  target >= {TARGET}x: {verdict(met)}")
    record_row("enqueue rate, no consumer", f"{o:.0f} tasks/s", f"{b:.0f} tasks/s", str(r),
               f">= {TARGET}x", met)


if __name__ == "__main__":
    main()
