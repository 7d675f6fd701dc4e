"""`VMTask`: the producer's handle on one task, with the members of IVMTask2.

The properties are live, as IVMTask2's are: each one reads the record again, in
one pipelined round trip.  To read several at one instant (and pay one round
trip for all), call `snapshot()`; ``id`` and ``description`` never change and are
served from memory after the first read.
"""

from __future__ import annotations

import logging
import time

from api.enums import VMTaskResult
from api.errors import InvalidArgumentError, InvalidTimeoutError
from api.protocol.records import TaskSnapshot
from api.store import TaskStore
from api.waiter import completions

log = logging.getLogger(__name__)

MAX_TIMEOUT_MS = 4_000_000
WAIT_FOREVER = -1


def validate_timeout(timeout: int) -> int:
    if isinstance(timeout, bool) or not isinstance(timeout, int):
        raise InvalidTimeoutError(f"timeout must be an int of milliseconds, not {timeout!r}")
    if timeout != WAIT_FOREVER and not 0 <= timeout <= MAX_TIMEOUT_MS:
        raise InvalidTimeoutError(
            f"timeout must be -1 (forever) or 0..{MAX_TIMEOUT_MS:,} ms, not {timeout}"
        )
    return timeout


class VMTask:
    def __init__(
        self, store: TaskStore, task_id: str, *, poll_interval: float = 1.0,
        host: str | None = None,
    ) -> None:
        self._store = store
        self._id = task_id
        self._host = host
        self._description: str | None = None
        # The safety net under pub/sub: how often a waiter re-reads the record anyway.
        self.poll_interval = poll_interval

    def __repr__(self) -> str:
        return f"<VMTask {self._id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VMTask) and other._id == self._id

    def __hash__(self) -> int:
        return hash(self._id)

    def snapshot(self) -> TaskSnapshot:
        """Every property at one instant, in one Redis round trip."""
        snapshot = self._store.read(self._id)
        self._description = snapshot.description
        self._host = snapshot.host
        return snapshot

    @property
    def id(self) -> str:
        return self._id

    @property
    def host(self) -> str:
        """The host that runs the task; fixed when it is enqueued."""
        if self._host is None:
            self.snapshot()
        assert self._host is not None
        return self._host

    @property
    def description(self) -> str:
        if self._description is None:
            self.snapshot()
        assert self._description is not None
        return self._description

    @property
    def percent_completed(self) -> int:
        return self.snapshot().percent_completed

    @property
    def is_complete(self) -> bool:
        return self.snapshot().is_complete

    @property
    def is_cancelable(self) -> bool:
        return self.snapshot().is_cancelable

    @property
    def result(self) -> VMTaskResult | None:
        return self.snapshot().result

    @property
    def error(self) -> int:
        return self.snapshot().error

    @property
    def error_description(self) -> str:
        return self.snapshot().error_description

    @property
    def children(self) -> list[VMTask]:
        """The tasks this composite task started, in the order it started them (a
        host evacuation's moves); [] for other tasks.  Two round trips.  (A child is
        listed in its parent's record just before it is queued: one not queued yet, or
        refused, is left out.)"""
        listed = list(self.snapshot().children)
        return [VMTask(self._store, child, poll_interval=self.poll_interval, host=snap.host)
                for child, snap in zip(listed, self._store.read_many(listed), strict=True)
                if snap is not None]

    @property
    def parent(self) -> VMTask | None:
        """The composite task that started this one, or None."""
        parent = self.snapshot().parent
        return None if parent is None else VMTask(self._store, parent,
                                                  poll_interval=self.poll_interval)

    def log(self, tail: int | None = None) -> list[str]:
        """The time-stamped lines the task's operation wrote, oldest first: its start,
        phases, commands, QEMU events, retries, warnings and its end (the last
        ``tail`` only, if given).  One Redis round trip.  The log keeps a task's last
        1,000 lines and expires with its record (`api.protocol.tasklog`)."""
        if tail is not None and (isinstance(tail, bool) or not isinstance(tail, int)
                                 or tail < 0):
            raise InvalidArgumentError(f"tail must be None or an int >= 0, not {tail!r}")
        return self._store.log(self._id, tail)

    def cancel(self) -> None:
        """Revoke a queued task, or ask a running cancelable one to stop.

        Raises `TaskNotCancelableError` for an operation that cannot be cancelled or
        a task that is already complete.  A running task ends `Cancelled` once its
        worker notices the request, which survives worker and Redis restarts.
        """
        self._store.cancel(self._id)

    def wait_for_completion(self, timeout: int) -> bool:
        """Wait up to ``timeout`` ms (-1: forever); True once the task is complete.

        Subscribes to the task's channel before reading its state, so a completion
        that lands between the two is never missed; re-reads every `poll_interval`
        anyway in case a message is lost, and rides out Redis restarts.  Every wait
        of a server shares its one pub/sub connection (`api.waiter`).
        """
        validate_timeout(timeout)
        if timeout == 0:
            return self.snapshot().is_complete
        deadline = None if timeout == WAIT_FOREVER else time.monotonic() + timeout / 1000
        for _ in completions(self._store, [self._id], deadline, self.poll_interval):
            return True
        return False
