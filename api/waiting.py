"""Waiting for many tasks on one subscription: the bookkeeping, without I/O.

The sync waiter (`api.waiter`, a reader thread) and the asyncio one
(`api.aio_waiter`, a reader task) differ only in how they talk to Redis; which
channel to subscribe, which confirmation arms which wait, which wait a ``done``
message concerns, and when a wait must read its records again are decided here,
once.  `Pending` is one wait's side: which tasks it still waits for, which it
must read again, and in what order the finished ones are handed out.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from api.errors import InvalidArgumentError, TaskNotFoundError
from api.protocol import keys, records
from api.protocol.records import TaskSnapshot

DONE = "done"  # the task's record says it is complete: no need to read it
SYNC = "sync"  # a (re)subscription was confirmed: read the record again
Event = tuple[str, str]  # (DONE | SYNC, task id)

_CHANNEL_PREFIX = keys.task_channel("")


class Watch:
    """One wait's interest in some tasks; the waiter queues its events here."""

    def __init__(self, task_ids: Iterable[str]) -> None:
        self.channels: dict[str, str] = {keys.task_channel(i): i for i in task_ids}
        self.unconfirmed: set[str] = set()
        self.events: deque[Event] = deque()
        # Set once the wait has read its records after subscribing: from then on a
        # late or repeated confirmation means "read again".
        self.armed = False
        self.failure: BaseException | None = None

    def drain(self) -> list[Event]:
        taken: list[Event] = []
        while self.events:  # popleft, not a copy and clear: another thread may append
            taken.append(self.events.popleft())
        return taken

    def notify(self) -> None:
        """Wake the wait's owner (the waiter calls it after queueing events)."""


class WaitBook:
    """Which wait watches which channel, and what the connection must be told."""

    def __init__(self) -> None:
        self.watchers: dict[str, set[Watch]] = {}
        self.confirmed: set[str] = set()
        self._inflight: Counter[str] = Counter()  # SUBSCRIBEs sent, not yet confirmed
        self._subscribe: set[str] = set()
        self._unsubscribe: set[str] = set()
        self._connected = False
        self._connections = 0

    @property
    def reconnects(self) -> int:
        return max(0, self._connections - 1)

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def channel_count(self) -> int:
        return len(self.watchers)

    def add(self, watch: Watch) -> None:
        for channel in watch.channels:
            watching = self.watchers.get(channel)
            if watching is None:
                watching = self.watchers[channel] = set()
                self._subscribe.add(channel)
                self._unsubscribe.discard(channel)
            watching.add(watch)
            if channel not in self.confirmed:
                watch.unconfirmed.add(channel)

    def remove(self, watch: Watch) -> None:
        for channel in watch.channels:
            watching = self.watchers.get(channel)
            if watching is None:
                continue
            watching.discard(watch)
            if not watching:
                del self.watchers[channel]
                self.confirmed.discard(channel)
                self._subscribe.discard(channel)
                self._unsubscribe.add(channel)

    def requests(self) -> tuple[list[str], list[str]]:
        """The channels to subscribe and unsubscribe now (nothing while disconnected)."""
        if not self._connected:
            return [], []
        subscribe, unsubscribe = sorted(self._subscribe), sorted(self._unsubscribe)
        self._subscribe.clear()
        self._unsubscribe.clear()
        self._inflight.update(subscribe)
        return subscribe, unsubscribe

    def new_connection(self) -> None:
        """A fresh connection subscribes to everything wanted; nothing is confirmed."""
        self._connected = True
        self._connections += 1
        self._inflight.clear()
        self.confirmed.clear()
        self._subscribe = set(self.watchers)
        self._unsubscribe.clear()
        for watch in self.watches():
            watch.failure = None

    def lost(self, refusal: BaseException | None) -> set[Watch]:
        """The connection died; with a refused login, the waits are told why."""
        self._connected = False
        watches = self.watches()
        if refusal is not None:
            for watch in watches:
                watch.failure = refusal
        return watches

    def watches(self) -> set[Watch]:
        return {watch for watching in self.watchers.values() for watch in watching}

    def watched_tasks(self) -> list[str]:
        return [channel.removeprefix(_CHANNEL_PREFIX) for channel in self.watchers]

    def read_again(self, task_ids: Iterable[str]) -> set[Watch]:
        """The safety net found these tasks worth a read (complete, judged, gone): the
        waits watching them are told to read them again."""
        woken: set[Watch] = set()
        for task_id in task_ids:
            for watch in self.watchers.get(keys.task_channel(task_id), ()):
                watch.events.append((SYNC, task_id))
                woken.add(watch)
        return woken

    def received(self, message: Mapping[str, Any]) -> set[Watch]:
        """Queue what ``message`` means for each wait; the waits to wake."""
        kind, channel = message.get("type"), message.get("channel")
        if isinstance(channel, bytes):
            channel = channel.decode()
        if not isinstance(channel, str) or channel not in self.watchers:
            return set()
        watching = self.watchers[channel]
        task_id = channel.removeprefix(_CHANNEL_PREFIX)
        if kind == "message":
            data = message.get("data")
            if data not in (records.MSG_DONE, records.MSG_DONE.encode()):
                return set()  # progress and cancel requests change nothing for a wait
            for watch in watching:
                watch.events.append((DONE, task_id))
            return set(watching)
        if kind != "subscribe":
            return set()
        if self._inflight[channel] > 1:
            # A later SUBSCRIBE of the channel (sent after an UNSUBSCRIBE) is what counts.
            self._inflight[channel] -= 1
            return set()
        self._inflight.pop(channel, None)
        self.confirmed.add(channel)
        for watch in watching:
            if channel in watch.unconfirmed:
                watch.unconfirmed.discard(channel)
                if watch.armed:
                    watch.events.append((SYNC, task_id))
            else:
                watch.events.append((SYNC, task_id))  # subscribed anew: read it again
        return set(watching)


def task_ids_of(tasks: object, kind: type) -> dict[str, Any]:
    """The tasks to wait for by id, in the order given, each once; bad input refused."""
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Iterable):
        raise InvalidArgumentError(f"tasks must be an iterable of {kind.__name__}, "
                                   f"not {type(tasks).__name__}")
    by_id: dict[str, Any] = {}
    for task in tasks:
        if not isinstance(task, kind):
            raise InvalidArgumentError(f"tasks must be {kind.__name__} handles, "
                                       f"not {type(task).__name__}")
        by_id.setdefault(task.id, task)  # type: ignore[attr-defined]
    return by_id


class Pending:
    """One wait's progress: the tasks not yet seen complete, and those to read again."""

    def __init__(self, task_ids: Iterable[str]) -> None:
        self.pending: dict[str, None] = dict.fromkeys(task_ids)
        self.reread: set[str] = set(self.pending)

    def __bool__(self) -> bool:
        return bool(self.pending)

    def to_read(self) -> list[str]:
        wanted = [task_id for task_id in self.pending if task_id in self.reread]
        self.reread.clear()
        return wanted

    def poll(self) -> None:
        """The safety net's turn: read every task again, in case a message was lost."""
        self.reread = set(self.pending)

    def settle(self, ids: Sequence[str],
               snapshots: Sequence[TaskSnapshot | None]) -> list[str]:
        """The tasks these reads show complete, in the order they finished."""
        finished: list[tuple[float, int, str]] = []
        for index, (task_id, snapshot) in enumerate(zip(ids, snapshots, strict=True)):
            if snapshot is None:
                raise TaskNotFoundError(f"No task with id {task_id!r} (unknown, or expired)")
            if snapshot.is_complete and task_id in self.pending:
                del self.pending[task_id]
                finished.append((snapshot.finished or math.inf, index, task_id))
        return [task_id for _, _, task_id in sorted(finished)]

    def take(self, events: Iterable[Event]) -> list[str]:
        """The tasks these events show complete, in the order they were published."""
        done: list[str] = []
        for kind, task_id in events:
            if task_id not in self.pending:
                continue
            if kind == DONE:
                del self.pending[task_id]
                self.reread.discard(task_id)
                done.append(task_id)
            else:
                self.reread.add(task_id)
        return done


def all_complete(completed: Iterator[Any]) -> bool:
    """`wait_all` from `as_completed`: True when the iteration ends without a timeout."""
    try:
        for _ in completed:
            pass
    except TimeoutError:
        return False
    return True
