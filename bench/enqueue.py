"""Enqueue rate with no consumer: ``server.ping()`` against bare Celery's
``send_task("bare.noop")``.

Both workers run (vmtask's keeps its host heartbeat live, so submit sees a live
host) but neither consumes: their queue consumers are cancelled with
``control.cancel_consumer``.  Each round enqueues BENCH_ENQ_TASKS (default 1,000)
per side and checks that all of them are still queued; BENCH_ROUNDS rounds
(default 10), alternating.  Target: median per-round ratio of rates >= 0.9x.

Two pairs, like for like: vmtask as it ships (a task-sent event per task, so Flower
lists queued tasks) against bare Celery with ``task_send_sent_event`` on; and vmtask
with ``VMTASK_SENT_EVENTS=0`` against bare Celery at its defaults.
"""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api import VirtualServer
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
        previous = os.environ.get("VMTASK_SENT_EVENTS")
        os.environ["VMTASK_SENT_EVENTS"] = "0"
        try:
            quiet = VirtualServer(s.url, host=HOST)
        finally:
            if previous is None:
                del os.environ["VMTASK_SENT_EVENTS"]
            else:
                os.environ["VMTASK_SENT_EVENTS"] = previous
        bare_sent = bare_app.make_app(s.url)
        bare_sent.conf.task_send_sent_event = True
        client = s.client()
        stop_consuming(s)

        def side(name: str, send: Callable[[], object], queue: str) -> Callable[[], Cost]:
            meter = meter_for(s, "vmtask" if name.startswith("vmtask") else "bare")

            def run() -> Cost:
                client.delete(queue)
                cost = meter.run(N, lambda: [send() for _ in range(N)])
                assert client.llen(queue) == N
                return cost

            return run

        sides = {
            "vmtask": side("vmtask", server.ping, keys.host_queue(HOST)),
            "bare+sent": side("bare", lambda: bare_sent.send_task("bare.noop"), bare_app.QUEUE),
            "vmtask, no sent events": side("vmtask", quiet.ping, keys.host_queue(HOST)),
            "bare": side("bare", lambda: bare.send_task("bare.noop"), bare_app.QUEUE),
        }
        alternate(1, sides)  # warm-up
        results = alternate(ROUNDS, sides)
        quiet.close()
        bare_sent.close()
    print(f"Enqueue rate with no consumer, {N} tasks x {ROUNDS} alternating rounds:")
    for ours_name, base_name, label in (
            ("vmtask", "bare+sent", "enqueue rate, no consumer, task-sent events on"),
            ("vmtask, no sent events", "bare", "enqueue rate, no consumer, no task-sent events")):
        ours, base = results[ours_name], results[base_name]
        r = ratio(ours, base, lambda c: c.rate)
        o = statistics.median(c.rate for c in ours)
        b = statistics.median(c.rate for c in base)
        met = r.median >= TARGET
        print(f"  {ours_name:24} {o:7.1f} tasks/s  {cpu_line(ours)}")
        print(f"  {'bare Celery ' + base_name:24} {b:7.1f} tasks/s  {cpu_line(base)}")
        print(f"  ratio: {r}  target >= {TARGET}x: {verdict(met)}")
        record_row(label, f"{o:.0f} tasks/s", f"{b:.0f} tasks/s", str(r), f">= {TARGET}x",
                   met)


if __name__ == "__main__":
    main()
