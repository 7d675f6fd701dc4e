"""How fast wait_for_completion notices completion, against two baselines in one run.

- raw: a Redis PUBLISH -> the subscriber receives it (the floor for any pub/sub wait);
- celery: a bare Celery task's AsyncResult.get() on the same broker/backend/worker.

Latency is from the moment the work ended (a time.time() stamp taken in the worker,
same machine clock) to the moment the waiting call returns.  Prints medians and the
ratios; target: vmtask <= 2x raw pub/sub.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
from celery import Celery

from api import VirtualServer
from bench.common import median_ms, redis_and_worker

ROUNDS = 60


def raw_pubsub(url: str) -> list[float]:
    client = redis.Redis.from_url(url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("bench:raw")
    pubsub.get_message(timeout=1)  # the subscribe confirmation
    samples: list[float] = []
    for _ in range(ROUNDS):
        timer = threading.Timer(0.02, lambda: client.publish("bench:raw", repr(time.time())))
        timer.start()
        message = None
        while message is None:
            message = pubsub.get_message(timeout=5)
        samples.append(time.time() - float(message["data"]))
        timer.join()
    return samples


def vmtask_wait(url: str, host: str) -> list[float]:
    server = VirtualServer(url, host=host)
    samples: list[float] = []
    for _ in range(ROUNDS):
        task = server.ping(duration_ms=20)
        assert task.wait_for_completion(10_000)
        returned = time.time()
        finished = task.snapshot().finished
        assert finished is not None
        samples.append(returned - finished)
    return samples


def celery_get(url: str, host: str) -> list[float]:
    app = Celery("bench", broker=url, backend=url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
    samples: list[float] = []
    for _ in range(ROUNDS):
        result = app.send_task("bench.stamp_after", args=[0.02], queue=f"host.{host}")
        stamp = result.get(timeout=10)
        samples.append(time.time() - stamp)
    return samples


def main() -> None:
    with redis_and_worker() as (url, host):
        vmtask_wait(url, host)[:5]  # warm-up: pool processes, connections, scripts
        celery_get(url, host)[:5]
        raw = median_ms(raw_pubsub(url))
        ours = median_ms(vmtask_wait(url, host))
        celery = median_ms(celery_get(url, host))
    print(f"completion-notice latency, median of {ROUNDS}:")
    print(f"  raw Redis PUBLISH -> receive     {raw:7.3f} ms")
    print(f"  vmtask wait_for_completion       {ours:7.3f} ms")
    print(f"  Celery AsyncResult.get()         {celery:7.3f} ms")
    print(f"ratio vmtask / raw pub/sub:   {ours / raw:5.2f}x  (target <= 2)")
    print(f"ratio vmtask / Celery get():  {ours / celery:5.2f}x")


if __name__ == "__main__":
    main()
