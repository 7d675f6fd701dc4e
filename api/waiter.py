"""Every wait of one server on one pub/sub connection (`TaskWaiter`).

A wait subscribes to its tasks' channels, and only once Redis has confirmed the
subscription does it read their records: a completion that lands in between is
then either in the record or on the channel (the subscribe-then-read rule).  Here
the subscriptions of every wait of a server share one connection, read by one
thread, which hands each ``done`` message to the waits that watch its task, as
Celery's Redis result consumer multiplexes an app's waits over one subscription.

The connection is the only state that can go stale: after a Redis restart or a
Sentinel failover the reader subscribes again to every channel wanted, and each
confirmation that comes back tells the waits watching it to read that record again,
since a completion may have happened while no subscription existed.  The
bookkeeping is `api.waiting.WaitBook`, shared with the asyncio waiter (`api.aio_waiter`).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import redis

from api.errors import BrokerAccessDeniedError, BrokerUnavailableError
from api.protocol.records import TaskSnapshot
from api.store import CONNECTION_ERRORS, access_denied, refusal_of
from api.waiting import Event, Pending, WaitBook, Watch

if TYPE_CHECKING:
    from api.store import TaskStore

# A wait rides these out until its deadline; a refused login it does not.
RETRYABLE_WAIT_ERRORS: tuple[type[Exception], ...] = (BrokerUnavailableError, *CONNECTION_ERRORS)


def raise_unless_retryable(url: str, exc: Exception, deadline: float | None,
                           waiting: int) -> None:
    """After a failed read of the waited records: raise what ends the wait (an ACL
    refusal, or Redis still away at the deadline); return when the read may be
    tried again.  Shared by the sync and async waits."""
    refusal = refusal_of(exc)
    if refusal is not None:
        raise access_denied(url, refusal) from None
    if deadline is not None and time.monotonic() >= deadline:
        raise BrokerUnavailableError(
            f"Redis was unreachable until the wait for {waiting} task(s) timed out"
        ) from exc


log = logging.getLogger(__name__)

# What ends a reader's connection: it subscribes anew on a fresh one.
READER_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, OSError)
IDLE_SECONDS = 1.0
FLUSH_SECONDS = 0.5  # how often an idle reader looks whether it was closed


class ThreadWatch(Watch):
    """A `Watch` whose owner blocks in another thread until events arrive."""

    def __init__(self, task_ids: Iterable[str]) -> None:
        super().__init__(task_ids)
        self.ready = threading.Condition(threading.Lock())

    def notify(self) -> None:
        with self.ready:
            self.ready.notify_all()

    def take(self, timeout: float) -> list[Event]:
        """Every event queued, waiting up to ``timeout`` s for the first."""
        with self.ready:
            if not self.events and self.failure is None:
                self.ready.wait(max(0.0, timeout))
            return self.drain()

    def wait_confirmed(self, timeout: float) -> bool:
        with self.ready:
            self.ready.wait_for(lambda: not self.unconfirmed or self.failure is not None,
                                max(0.0, timeout))
            self.armed = True
            return not self.unconfirmed


class TaskWaiter:
    """One pub/sub connection and its reader thread, for every wait of a client."""

    def __init__(self, client: redis.Redis, *, owns_client: bool = False) -> None:
        self._client = client
        self._owns_client = owns_client
        self._lock = threading.Lock()
        self._book = WaitBook()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._pid = os.getpid()
        self._pubsub: Any = None
        # Releases asked for, and those whose UNSUBSCRIBE the reader has sent.
        self._asked = self._sent = 0
        self._flushed = threading.Condition(self._lock)

    @property
    def reconnects(self) -> int:
        """How many times the reader had to subscribe anew (Redis restarted, failed over)."""
        return self._book.reconnects

    def watch(self, task_ids: Collection[str]) -> ThreadWatch:
        """Start watching ``task_ids``; wait for ``watch.wait_confirmed`` before reading."""
        watch = ThreadWatch(task_ids)
        with self._lock:
            if self._closed:
                raise RuntimeError("the waiter is closed")
            if self._pid != os.getpid():
                self._forked()
            self._book.add(watch)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="vmtask-waiter",
                                                daemon=True)
                self._thread.start()
        self._wake()
        return watch

    def _forked(self) -> None:
        """In a child process (a prefork pool): the reader thread and its connection
        stayed with the parent; start afresh."""
        self._pid = os.getpid()
        self._book = WaitBook()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._thread = None
        self._pubsub = None
        self._asked = self._sent = 0

    def release(self, watch: Watch) -> None:
        """Stop watching; returns once the reader has sent the UNSUBSCRIBE (at most
        `FLUSH_SECONDS`), so that a wait's commands are all sent when it returns."""
        with self._lock:
            self._book.remove(watch)
            self._asked += 1
            mine = self._asked
        self._wake()
        with self._flushed:
            self._flushed.wait_for(lambda: self._sent >= mine or not self._book.connected,
                                   FLUSH_SECONDS)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            thread = self._thread
        self._wake()
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)
        self._wake_r.close()
        self._wake_w.close()
        if self._owns_client:
            self._client.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # already awake, or closed

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    # -- the reader thread ---------------------------------------------------

    def _run(self) -> None:
        backoff = 0.05
        while True:
            with self._lock:
                if self._closed:
                    break
            try:
                self._serve()
                break
            except READER_ERRORS as exc:
                self._discard()
                refusal = refusal_of(exc)
                with self._lock:
                    watches = self._book.lost(refusal)
                    self._flushed.notify_all()
                for watch in watches:
                    watch.notify()
                log.warning("The task waiter lost Redis; subscribing again: %s", exc)
                time.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
        self._discard()

    def _discard(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                pubsub.close()
            except READER_ERRORS:
                pass

    def _serve(self) -> None:
        """Send what the waits asked for and hand out what Redis says, until closed."""
        pubsub = self._pubsub = self._client.pubsub(ignore_subscribe_messages=False)
        with self._lock:
            self._book.new_connection()
        while True:
            with self._lock:
                if self._closed:
                    return
                subscribe, unsubscribe = self._book.requests()
                asked = self._asked
            if subscribe:
                pubsub.subscribe(*subscribe)
            if unsubscribe:
                pubsub.unsubscribe(*unsubscribe)
            with self._flushed:
                self._sent = asked
                self._flushed.notify_all()
            self._wait_readable(pubsub)
            notified: set[Watch] = set()
            while (message := pubsub.get_message(timeout=0.0)) is not None:
                with self._lock:
                    notified |= self._book.received(message)
            for watch in notified:
                watch.notify()

    def _wait_readable(self, pubsub: Any) -> None:
        """Until Redis sends something or a wait asks for something (the wake socket)."""
        connection = pubsub.connection
        sock = getattr(connection, "_sock", None) if connection is not None else None
        if sock is None or not pubsub.subscribed:
            select.select([self._wake_r], [], [], IDLE_SECONDS)
        elif not connection.can_read(timeout=0):
            select.select([sock, self._wake_r], [], [], IDLE_SECONDS)
        self._drain_wake()


def completions(store: TaskStore, task_ids: Collection[str], deadline: float | None,
                poll_interval: float) -> Iterator[str]:
    """The ids of ``task_ids`` as each is seen complete, in completion order, until all
    are or ``deadline`` (monotonic; None: never) passes.

    Rides out a lost Redis (`BrokerUnavailableError` only if it is still away at the
    deadline); a refused login raises `BrokerAccessDeniedError` at once.
    """
    waiter = store.waiter
    pending = Pending(task_ids)
    if not pending:
        return
    watch = waiter.watch(list(pending.pending))
    try:
        watch.wait_confirmed(_left(deadline, poll_interval))
        next_poll = time.monotonic() + poll_interval
        backoff = 0.05
        while pending:
            if watch.failure is not None:
                raise access_denied(store.url, watch.failure)
            wanted = pending.to_read()
            if wanted:
                try:
                    snapshots = read_judged(store, wanted)
                except BrokerAccessDeniedError:
                    raise
                except RETRYABLE_WAIT_ERRORS as exc:
                    raise_unless_retryable(store.url, exc, deadline, len(pending.pending))
                    pending.reread.update(wanted)
                    time.sleep(min(backoff, _left(deadline, backoff)))
                    backoff = min(backoff * 2, 1.0)
                    continue
                backoff = 0.05
                yield from pending.settle(wanted, snapshots)
                continue
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return
            if now >= next_poll:
                pending.poll()
                next_poll = now + poll_interval
                continue
            limit = next_poll if deadline is None else min(next_poll, deadline)
            yield from pending.take(watch.take(limit - now))
    finally:
        waiter.release(watch)


def read_judged(store: TaskStore, task_ids: Sequence[str]) -> list[TaskSnapshot | None]:
    """Every snapshot in one round trip; a started task whose lease ran out is judged
    crashed (ThreadCrashError) and read again, as `VMTask.snapshot` does."""
    snapshots = store.read_many(task_ids)
    for index, snapshot in enumerate(snapshots):
        if snapshot is not None and snapshot.is_crashed_candidate and \
                store.judge_crashed(snapshot.id):
            snapshots[index] = store.read_many([snapshot.id])[0]
    return snapshots


def _left(deadline: float | None, at_most: float) -> float:
    return at_most if deadline is None else max(0.0, min(at_most, deadline - time.monotonic()))
