"""Riding out a Redis outage: the one way the worker repeats a call while Redis
restarts, is killed, fails over or is stopped, from a task's final write to a
transfer's coordination (`TaskRun.ride_out` bounds it by the task's own limits)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis

log = logging.getLogger(__name__)

T = TypeVar("T")

# What a call meets while Redis is away: restarting, killed, failing over, stopped.
REDIS_AWAY = (redis.ConnectionError, redis.TimeoutError)
# Between two tries of a call that met Redis away.
RIDE_OUT_PAUSE = 0.5


def ride_out(call: Callable[[], T], *, seconds: float, what: str,
             pause: float = RIDE_OUT_PAUSE, sleep: Callable[[float], None] = time.sleep,
             on_retry: Callable[[BaseException], None] | None = None) -> T:
    """``call()``, made again while Redis is away (a restart, a kill, a SIGSTOP) until
    it answers; the last error once ``seconds`` have passed.  The one way the worker
    rides out an outage, from a task's final write to a transfer's coordination.

    ``call`` must be safe to repeat: idempotent, or recognising its own earlier try
    (a reply lost with the connection says nothing of whether the write was made).
    The client's own retry (a few tries within a second) covers a blip; this covers
    a restart, which takes seconds.
    """
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except REDIS_AWAY as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("Redis unavailable while %s; trying again: %s", what, exc)
            if on_retry is not None:
                on_retry(exc)
            sleep(pause)
