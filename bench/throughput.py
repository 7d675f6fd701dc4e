"""No-op throughput through VirtualServer.ping against bare Celery, in one run.

Both go through the same private Redis (broker and backend) and the same worker
(prefork pool, same concurrency).  Each round enqueues N tasks, then waits for all.
Rounds alternate so drift on a noisy machine hits both.  Target: >= 0.9x bare Celery.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from celery import Celery

from api import VirtualServer
from bench.common import redis_and_worker

N = 300
ROUNDS = 3


def vmtask_round(server: VirtualServer) -> float:
    started = time.perf_counter()
    tasks = [server.ping() for _ in range(N)]
    for task in tasks:
        assert task.wait_for_completion(60_000)
    return N / (time.perf_counter() - started)


def celery_round(app: Celery, queue: str) -> float:
    started = time.perf_counter()
    results = [app.send_task("bench.noop", queue=queue) for _ in range(N)]
    for result in results:
        result.get(timeout=60)
    return N / (time.perf_counter() - started)


def main() -> None:
    with redis_and_worker() as (url, host):
        server = VirtualServer(url, host=host)
        app = Celery("bench", broker=url, backend=url, set_as_current=False)
        app.conf.update(task_serializer="json", accept_content=["json"],
                        result_serializer="json")
        ours: list[float] = []
        bare: list[float] = []
        for _ in range(ROUNDS):
            bare.append(celery_round(app, f"host.{host}"))
            ours.append(vmtask_round(server))
    o, b = statistics.median(ours), statistics.median(bare)
    print(f"no-op throughput, {N} tasks x {ROUNDS} rounds (median):")
    print(f"  bare Celery send_task + get      {b:8.1f} tasks/s")
    print(f"  vmtask VirtualServer.ping + wait {o:8.1f} tasks/s")
    print(f"ratio vmtask / bare Celery: {o / b:5.2f}x  (target >= 0.9)")


if __name__ == "__main__":
    main()
