"""The lease keeper renews every running task's lease, whatever ran before it.

Seen in the netns copy tests: a task that ended before the keeper's thread first
ran killed that thread (it looked for the settings among the running tasks and
found none), and from then on no lease of that pool process was renewed: the next
task there, alive and well, was judged crashed one lease later.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from api.protocol import keys
from api.settings import Settings
from workers.devtools.sandbox import RedisServer
from workers.runtime import LeaseKeeper, TaskRun, WorkerRedis, worker_identity

LEASE = 1.5


def test_a_task_after_one_that_ended_at_once_keeps_its_lease(
        spawn: Callable[..., Any]) -> None:
    redis_server: RedisServer = spawn("redis")
    client = redis_server.client()
    settings = Settings(redis_url=redis_server.url, host="lk", lease_seconds=LEASE)
    conn = WorkerRedis(settings)
    keeper = LeaseKeeper()
    quick = TaskRun("quick", settings, conn)
    keeper.hold(quick)
    keeper.release(quick)  # ended before the keeper's thread looked at it

    identity = worker_identity(settings)
    client.hset(keys.task_record("long"), mapping={"state": "STARTED", "worker": identity})
    client.set(keys.task_lease("long"), identity, px=int(LEASE * 1000))
    long = TaskRun("long", settings, conn)
    keeper.hold(long)
    # Watched for three leases: the lease must never lapse, and must be renewed.
    renewed = False
    last = LEASE * 1000
    deadline = time.monotonic() + 3 * LEASE
    while time.monotonic() < deadline:
        left = client.pttl(keys.task_lease("long"))
        assert left > 0, "the lease lapsed: nobody renews it"
        renewed = renewed or left > last
        last = left
        time.sleep(0.05)
    assert renewed
    assert not long.lease_lost.is_set()
    keeper.release(long)
