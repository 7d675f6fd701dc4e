"""Every wait of an asyncio server on one pub/sub connection per event loop.

`api.waiter` for coroutines: one reader task owns the connection; the waits tell
it what to subscribe and it hands out the ``done`` messages and (re)subscription
confirmations, with the same bookkeeping (`api.waiting`).  A read is never
cancelled half-way (that would lose a reply): the reader keeps one read pending
and sends the waits' subscriptions beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Iterable
from typing import TYPE_CHECKING, Any

from api.errors import BrokerAccessDeniedError, BrokerUnavailableError
from api.protocol.records import TaskSnapshot
from api.store import access_denied, refusal_of
from api.waiter import READER_ERRORS, RETRYABLE_WAIT_ERRORS, raise_unless_retryable
from api.waiting import Event, Pending, WaitBook, Watch

if TYPE_CHECKING:
    from api.aio_store import AsyncTaskStore

log = logging.getLogger(__name__)

READ_SECONDS = 1.0  # one pending read's length: a closed waiter notices within it
POLL_BATCH = 500  # tasks looked at per poll_interval: what a poll may hold the loop for


class AsyncWatch(Watch):
    """A `Watch` whose owner awaits a future the reader resolves (no task per wait)."""

    def __init__(self, task_ids: Iterable[str]) -> None:
        super().__init__(task_ids)
        self._loop = asyncio.get_running_loop()
        self._woken: asyncio.Future[None] | None = None

    def notify(self) -> None:
        if self._woken is not None and not self._woken.done():
            self._woken.set_result(None)

    async def _sleep(self, timeout: float) -> None:
        """Until `notify` or ``timeout`` s."""
        woken = self._woken = self._loop.create_future()
        timer = self._loop.call_later(max(0.0, timeout), self.notify)
        try:
            await woken
        finally:
            timer.cancel()
            self._woken = None

    async def take(self, timeout: float) -> list[Event]:
        if not self.events and self.failure is None:
            await self._sleep(timeout)
        return self.drain()

    async def wait_confirmed(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.unconfirmed and self.failure is None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await self._sleep(left)
        self.armed = True
        self.events.clear()  # confirmations only: the first read follows
        return not self.unconfirmed


class ReadBatcher:
    """Reads asked for while one is in flight go together in the next pipeline.

    Two thousand waits that each read their record after subscribing would queue two
    thousand round trips on the server's few command connections, and a completion
    would be noticed only once its wait's turn came; batched, they cost a few."""

    BATCH = 1000

    def __init__(self, read_many: Callable[[list[str]], Awaitable[list[TaskSnapshot | None]]],
                 ) -> None:
        self._read_many = read_many
        self._wanted: dict[str, list[asyncio.Future[TaskSnapshot | None]]] = {}
        self._flusher: asyncio.Task[None] | None = None

    async def read(self, task_ids: list[str]) -> list[TaskSnapshot | None]:
        loop = asyncio.get_running_loop()
        futures = []
        for task_id in task_ids:
            future: asyncio.Future[TaskSnapshot | None] = loop.create_future()
            self._wanted.setdefault(task_id, []).append(future)
            futures.append(future)
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        return [await future for future in futures]

    async def _flush(self) -> None:
        while self._wanted:
            ids = list(self._wanted)[:self.BATCH]
            waiting = {task_id: self._wanted.pop(task_id) for task_id in ids}
            try:
                snapshots = await self._read_many(ids)
            except Exception as exc:  # noqa: BLE001 - each reader gets it, as its own
                for futures in waiting.values():
                    for future in futures:
                        if not future.done():
                            future.set_exception(exc)
                continue
            for task_id, snapshot in zip(ids, snapshots, strict=True):
                for future in waiting[task_id]:
                    if not future.done():
                        future.set_result(snapshot)


class AsyncTaskWaiter:
    """One pub/sub connection and its reader task, for every wait on one event loop."""

    def __init__(self, make_pubsub: Callable[[], Any],
                 read_many: Callable[[list[str]], Awaitable[list[TaskSnapshot | None]]],
                 worth_reading: Callable[[list[str]], Awaitable[list[str]]],
                 poll_interval: float = 1.0) -> None:
        self._make_pubsub = make_pubsub
        self._worth_reading = worth_reading
        self.reads = ReadBatcher(read_many)
        self.poll_interval = poll_interval
        self._book = WaitBook()
        self._wake = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def connected(self) -> bool:
        return self._book.connected

    @property
    def reconnects(self) -> int:
        return self._book.reconnects

    def watch(self, task_ids: Collection[str]) -> AsyncWatch:
        if self._closed:
            raise RuntimeError("the waiter is closed")
        watch = AsyncWatch(task_ids)
        self._book.add(watch)
        loop = asyncio.get_running_loop()
        if self._reader is None or self._reader.done():
            self._reader = loop.create_task(self._run(), name="vmtask-aio-waiter")
        if self._poller is None or self._poller.done():
            self._poller = loop.create_task(self._poll(), name="vmtask-aio-poller")
        self._wake.set()
        return watch

    def release(self, watch: Watch) -> None:
        self._book.remove(watch)
        self._wake.set()

    async def close(self) -> None:
        self._closed = True
        for task in (self._reader, self._poller):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _poll(self) -> None:
        """The safety net under pub/sub, for every wait at once: every poll_interval,
        a look at the state and lease of up to `POLL_BATCH` watched tasks, in turn (a
        task of 2,000 watched is looked at every fourth turn); a wait is told to read
        again only the tasks found complete (or gone, or to be judged crashed).  Waits
        that each polled would queue hundreds of reads on the few command connections,
        and a completion would wait behind them; whole records of thousands of tasks
        would hold the loop while they are parsed."""
        cursor = 0
        while not self._closed:
            await asyncio.sleep(self.poll_interval)
            ids = self._book.watched_tasks()
            if not ids:
                continue
            cursor %= len(ids)
            batch = (ids[cursor:] + ids[:cursor])[:POLL_BATCH]
            cursor += len(batch)
            try:
                worth = await self._worth_reading(batch)
            except RETRYABLE_WAIT_ERRORS:
                continue  # the waits see Redis away at their deadline
            for watch in self._book.read_again(worth):
                watch.notify()

    async def _run(self) -> None:
        backoff = 0.05
        while not self._closed:
            pubsub = self._make_pubsub()
            try:
                await self._serve(pubsub)
                backoff = 0.05
            except READER_ERRORS as exc:
                for watch in self._book.lost(refusal_of(exc)):
                    watch.notify()
                log.warning("The asyncio task waiter lost Redis; subscribing again: %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
            finally:
                with contextlib.suppress(*READER_ERRORS, RuntimeError):
                    await pubsub.aclose()

    async def _serve(self, pubsub: Any) -> None:
        self._book.new_connection()
        read: asyncio.Future[Any] | None = None
        waker: asyncio.Future[Any] | None = None
        try:
            while not self._closed:
                if waker is not None and waker.done():
                    self._wake.clear()
                    waker = None
                subscribe, unsubscribe = self._book.requests()
                if subscribe:
                    await pubsub.subscribe(*subscribe)
                if unsubscribe:
                    await pubsub.unsubscribe(*unsubscribe)
                if read is None and pubsub.subscribed:
                    read = asyncio.ensure_future(pubsub.get_message(timeout=READ_SECONDS))
                if waker is None or waker.done():
                    waker = asyncio.ensure_future(self._wake.wait())
                waiting = {waker} if read is None else {waker, read}
                await asyncio.wait(waiting, timeout=READ_SECONDS,
                                   return_when=asyncio.FIRST_COMPLETED)
                if read is not None and read.done():
                    message, read = read.result(), None
                    if message is not None:
                        for watch in self._book.received(message):
                            watch.notify()
        finally:
            for pending in (read, waker):
                if pending is not None:
                    pending.cancel()


async def completions(store: AsyncTaskStore, waiter: AsyncTaskWaiter,
                      task_ids: Collection[str], deadline: float | None,
                      poll_interval: float) -> AsyncGenerator[str, None]:
    """`api.waiter.completions` for coroutines: each id as its task is seen complete,
    in completion order, until all are or ``deadline`` (monotonic) passes."""
    pending = Pending(task_ids)
    if not pending:
        return
    watch = waiter.watch(list(pending.pending))
    try:
        await watch.wait_confirmed(_left(deadline, poll_interval))
        backoff = 0.05
        while pending:
            if watch.failure is not None:
                raise access_denied(store.url, watch.failure)
            wanted = pending.to_read()
            if wanted:
                try:
                    snapshots = await read_judged(store, waiter, wanted)
                except BrokerAccessDeniedError:
                    raise
                except RETRYABLE_WAIT_ERRORS as exc:
                    raise_unless_retryable(store.url, exc, deadline, len(pending.pending))
                    pending.reread.update(wanted)
                    await asyncio.sleep(min(backoff, _left(deadline, backoff)))
                    backoff = min(backoff * 2, 1.0)
                    continue
                backoff = 0.05
                for task_id in pending.settle(wanted, snapshots):
                    yield task_id
                continue
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                if not waiter.connected:
                    raise BrokerUnavailableError(
                        "Redis was unreachable until the wait for "
                        f"{len(pending.pending)} task(s) timed out")
                return
            # The waiter's poller is the safety net (`AsyncTaskWaiter._poll`).
            limit = now + READ_SECONDS if deadline is None else min(now + READ_SECONDS, deadline)
            for task_id in pending.take(await watch.take(limit - now)):
                yield task_id
    finally:
        waiter.release(watch)


async def read_judged(store: AsyncTaskStore, waiter: AsyncTaskWaiter,
                      task_ids: list[str]) -> list[TaskSnapshot | None]:
    """`api.waiter.read_judged`: one round trip (shared with other waits' reads),
    crashed tasks judged and read again."""
    snapshots = await waiter.reads.read(task_ids)
    for index, snapshot in enumerate(snapshots):
        if snapshot is not None and snapshot.is_crashed_candidate and \
                await store.judge_crashed(snapshot.id):
            snapshots[index] = (await store.read_many([snapshot.id]))[0]
    return snapshots


def _left(deadline: float | None, at_most: float) -> float:
    return at_most if deadline is None else max(0.0, min(at_most, deadline - time.monotonic()))
