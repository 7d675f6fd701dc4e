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
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from typing import TYPE_CHECKING, Any

from api.errors import BrokerAccessDeniedError, BrokerUnavailableError
from api.protocol.records import TaskSnapshot
from api.store import access_denied, refusal_of
from api.waiter import READER_ERRORS, RETRYABLE_WAIT_ERRORS
from api.waiting import Event, Pending, WaitBook, Watch

if TYPE_CHECKING:
    from api.aio_store import AsyncTaskStore

log = logging.getLogger(__name__)

READ_SECONDS = 1.0  # one pending read's length: a closed waiter notices within it


class AsyncWatch(Watch):
    def __init__(self, task_ids: Iterable[str]) -> None:
        super().__init__(task_ids)
        self.ready = asyncio.Event()

    def notify(self) -> None:
        self.ready.set()

    async def take(self, timeout: float) -> list[Event]:
        if not self.events and self.failure is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ready.wait(), max(0.0, timeout))
        self.ready.clear()
        return self.drain()

    async def wait_confirmed(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.unconfirmed and self.failure is None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ready.wait(), left)
            self.ready.clear()
        self.armed = True
        self.events.clear()  # confirmations only: the first read follows
        return not self.unconfirmed


class AsyncTaskWaiter:
    """One pub/sub connection and its reader task, for every wait on one event loop."""

    def __init__(self, make_pubsub: Callable[[], Any]) -> None:
        self._make_pubsub = make_pubsub
        self._book = WaitBook()
        self._wake = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def reconnects(self) -> int:
        return self._book.reconnects

    def watch(self, task_ids: Collection[str]) -> AsyncWatch:
        if self._closed:
            raise RuntimeError("the waiter is closed")
        watch = AsyncWatch(task_ids)
        self._book.add(watch)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(
                self._run(), name="vmtask-aio-waiter")
        self._wake.set()
        return watch

    def release(self, watch: Watch) -> None:
        self._book.remove(watch)
        self._wake.set()

    async def close(self) -> None:
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

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
        read: asyncio.Task[Any] | None = None
        try:
            while not self._closed:
                self._wake.clear()
                subscribe, unsubscribe = self._book.requests()
                if subscribe:
                    await pubsub.subscribe(*subscribe)
                if unsubscribe:
                    await pubsub.unsubscribe(*unsubscribe)
                if read is None and pubsub.subscribed:
                    read = asyncio.ensure_future(pubsub.get_message(timeout=READ_SECONDS))
                waker = asyncio.ensure_future(self._wake.wait())
                waiting = {waker} if read is None else {waker, read}
                await asyncio.wait(waiting, timeout=READ_SECONDS,
                                   return_when=asyncio.FIRST_COMPLETED)
                if not waker.done():
                    waker.cancel()
                if read is not None and read.done():
                    message, read = read.result(), None
                    if message is not None:
                        for watch in self._book.received(message):
                            watch.notify()
        finally:
            if read is not None:
                read.cancel()


async def completions(store: AsyncTaskStore, waiter: AsyncTaskWaiter,
                      task_ids: Collection[str], deadline: float | None,
                      poll_interval: float) -> AsyncIterator[str]:
    """`api.waiter.completions` for coroutines: each id as its task is seen complete,
    in completion order, until all are or ``deadline`` (monotonic) passes."""
    pending = Pending(task_ids)
    if not pending:
        return
    watch = waiter.watch(list(pending.pending))
    try:
        await watch.wait_confirmed(_left(deadline, poll_interval))
        next_poll = time.monotonic() + poll_interval
        backoff = 0.05
        while pending:
            if watch.failure is not None:
                raise access_denied(store.url, watch.failure)
            wanted = pending.to_read()
            if wanted:
                try:
                    snapshots = await read_judged(store, wanted)
                except BrokerAccessDeniedError:
                    raise
                except RETRYABLE_WAIT_ERRORS as exc:
                    refusal = refusal_of(exc)
                    if refusal is not None:
                        raise access_denied(store.url, refusal) from None
                    if deadline is not None and time.monotonic() >= deadline:
                        raise BrokerUnavailableError(
                            "Redis was unreachable until the wait for "
                            f"{len(pending.pending)} task(s) timed out") from exc
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
                return
            if now >= next_poll:
                pending.poll()
                next_poll = now + poll_interval
                continue
            limit = next_poll if deadline is None else min(next_poll, deadline)
            for task_id in pending.take(await watch.take(limit - now)):
                yield task_id
    finally:
        waiter.release(watch)


async def read_judged(store: AsyncTaskStore,
                      task_ids: list[str]) -> list[TaskSnapshot | None]:
    """`api.waiter.read_judged`: one round trip, crashed tasks judged and read again."""
    snapshots = await store.read_many(task_ids)
    for index, snapshot in enumerate(snapshots):
        if snapshot is not None and snapshot.is_crashed_candidate and \
                await store.judge_crashed(snapshot.id):
            snapshots[index] = (await store.read_many([snapshot.id]))[0]
    return snapshots


def _left(deadline: float | None, at_most: float) -> float:
    return at_most if deadline is None else max(0.0, min(at_most, deadline - time.monotonic()))
