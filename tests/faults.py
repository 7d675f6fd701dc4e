"""Faults the tests cause: Redis restarted (or killed) and back on its port, a task's
qemu-img stopped mid-way, and the peer task of a two-task operation."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from api import VirtualServer, VMTask
from api.protocol import keys
from tests.helpers import pids_of
from workers.devtools.sandbox import RedisServer, wait_until

# Redis stays down this long in a restart: a short outage, as a service restart makes.
DOWN = 1.5


def restart(redis: RedisServer, *, kill: bool = False, down: float = DOWN) -> None:
    """Stop Redis (SIGTERM: it writes its AOF and exits; or kill -9: it loses what
    it had not fsynced), keep it down ``down`` seconds, start it on the same port."""
    assert redis.proc is not None
    if kill:
        os.kill(redis.proc.pid, signal.SIGKILL)
        redis.proc.wait()
        redis.proc = None
    else:
        redis.stop()
    time.sleep(down)  # the outage itself: no condition to wait for
    redis.start()


@contextmanager
def held(task_id: str) -> Iterator[None]:
    """The task's qemu-img stopped (SIGSTOP) inside the block: its transfer stands
    mid-way, both sides waiting on each other through Redis."""
    pids = wait_until(lambda: pids_of(f"vmtask-{task_id}"), 60, "the pull's qemu-img")
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with suppress(ProcessLookupError):  # ended meanwhile (a cancel, a lost lease)
                os.kill(pid, signal.SIGCONT)


def peer_of(server: VirtualServer, task: VMTask, field: str) -> VMTask:
    arguments = json.loads(server.redis.hget(keys.task_record(task.id), "arguments") or "{}")
    return server.get_task(arguments[field])
