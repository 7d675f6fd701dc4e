"""The producer API for asyncio: `AsyncVirtualServer` and its `AsyncVMTask` handles.

The same operations, names and errors as `VirtualServer` and `VMTask`, awaited,
on ``redis.asyncio`` (no threads).  The protocol is shared with the sync client:
the records, keys and scripts' calls (`api.protocol`), the operations' checks
(`api.queued`), a submit's plan and its Celery message (`api.submitting`), and
the waiting bookkeeping (`api.waiting`); only the I/O is here.

Connections: at most `aio_store.COMMAND_CONNECTIONS` for commands, whatever the
number of coroutines, and one pub/sub connection per event loop for every wait
(`api.aio_waiter`), plus the one kombu uses to declare a queue the first time a
process sends to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Iterable, Sequence
from typing import Any, Self
from weakref import WeakKeyDictionary

from celery import Celery
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from api.aio_store import AsyncTaskStore, async_client, broker_errors, pipelined
from api.aio_waiter import AsyncTaskWaiter, completions
from api.arguments import check_int, check_task_id
from api.core import ALL_STATES, MAX_SCAN, producer_app
from api.enums import VMTaskResult
from api.errors import HostUnavailableError, InvalidArgumentError
from api.protocol import keys, taskcalls
from api.protocol.records import TaskSnapshot
from api.protocol.tasks import TaskSpec
from api.queued import QueuedOperations
from api.settings import Settings, redact_url, validate_host_name
from api.submitting import host_not_live, only_host, prepare
from api.task import WAIT_FOREVER, validate_timeout
from api.waiting import task_ids_of

__all__ = ["AsyncVMTask", "AsyncVirtualServer"]

SUBMITS_AT_ONCE = 16


class AsyncVMTask:
    """`VMTask` for coroutines: ``await task.snapshot()`` reads every property at once."""

    def __init__(self, server: AsyncVirtualServer, task_id: str, *, host: str | None = None,
                 description: str | None = None) -> None:
        self._server = server
        self._id = task_id
        self._host = host
        self._description = description

    def __repr__(self) -> str:
        return f"<AsyncVMTask {self._id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AsyncVMTask) and other._id == self._id

    def __hash__(self) -> int:
        return hash(self._id)

    @property
    def id(self) -> str:
        return self._id

    @property
    def host(self) -> str | None:
        """The host that runs the task (known once submitted or read)."""
        return self._host

    @property
    def description(self) -> str | None:
        return self._description

    async def snapshot(self) -> TaskSnapshot:
        """Every IVMTask2 property at one instant, in one Redis round trip."""
        snapshot = await self._server.store.read(self._id)
        self._host, self._description = snapshot.host, snapshot.description
        return snapshot

    async def percent_completed(self) -> int:
        return (await self.snapshot()).percent_completed

    async def is_complete(self) -> bool:
        return (await self.snapshot()).is_complete

    async def result(self) -> VMTaskResult | None:
        return (await self.snapshot()).result

    async def log(self, tail: int | None = None) -> list[str]:
        """`VMTask.log`: the task's log lines, oldest first."""
        if tail is not None and (isinstance(tail, bool) or not isinstance(tail, int)
                                 or tail < 0):
            raise InvalidArgumentError(f"tail must be None or an int >= 0, not {tail!r}")
        return await self._server.store.log(self._id, tail)

    async def cancel(self) -> None:
        """`VMTask.cancel`: revoke a queued task, or ask a running cancelable one to stop."""
        await self._server.store.cancel(self._id)

    async def wait_for_completion(self, timeout: int) -> bool:
        """Wait up to ``timeout`` ms (-1: forever; 0: look once); True once complete.
        Shares the event loop's one pub/sub connection with every other wait."""
        validate_timeout(timeout)
        if timeout == 0:
            return (await self.snapshot()).is_complete
        deadline = None if timeout == WAIT_FOREVER else time.monotonic() + timeout / 1000
        # Closed at once, not when collected: that ends the wait's subscription.
        async with contextlib.aclosing(self._server.completions([self._id], deadline)) as done:
            async for _ in done:
                return True
        return False


class AsyncVirtualServer(QueuedOperations[Awaitable[AsyncVMTask]]):
    """`VirtualServer` for asyncio, one Redis; ``async with`` it, or ``await close()``."""

    def __init__(self, url: str | None = None, host: str | None = None, *,
                 poll_interval: float = 1.0) -> None:
        env = {k: v for k, v in os.environ.items() if k != "VMTASK_HOST"}
        if url is not None:
            env["VMTASK_REDIS_URL"] = url
        settings = Settings.from_env(env)
        self.endpoint = settings.endpoint
        self.url = self.endpoint.url
        explicit_host = host or os.environ.get("VMTASK_HOST") or None
        self.default_host = validate_host_name(explicit_host) if explicit_host else None
        self.poll_interval = poll_interval
        self.timeout = settings.redis_timeout_seconds
        self.sent_events = settings.sent_events
        self.redis = async_client(self.endpoint, self.timeout)
        self.store = AsyncTaskStore(self.redis, self.url, settings.retention_seconds,
                                    self.endpoint, settings.lease_seconds)
        self._waiters: WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncTaskWaiter] = \
            WeakKeyDictionary()
        self._pubsub_clients: list[Any] = []
        self._celery: Celery | None = None
        self._only_host: str | None = None
        self._submitting: asyncio.Semaphore | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {redact_url(self.url)} host={self.default_host}>"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        for waiter in list(self._waiters.values()):
            await waiter.close()
        self._waiters.clear()
        for client in self._pubsub_clients:
            await client.aclose(close_connection_pool=True)
        self._pubsub_clients.clear()
        if self._celery is not None:
            self._celery.close()
        await self.redis.aclose(close_connection_pool=True)

    @property
    def waiter(self) -> AsyncTaskWaiter:
        """The running loop's waiter: its one pub/sub connection for every wait."""
        loop = asyncio.get_running_loop()
        waiter = self._waiters.get(loop)
        if waiter is None:
            # Never retried by redis-py (up to 10 s between tries by default): the
            # waiter reconnects itself, within a second.
            client = async_client(self.endpoint, self.timeout, max_connections=1,
                                  retry=Retry(NoBackoff(), 0))
            self._pubsub_clients.append(client)
            waiter = self._waiters[loop] = AsyncTaskWaiter(
                lambda: client.pubsub(ignore_subscribe_messages=False), self.store.read_many,
                self.store.worth_reading, self.poll_interval)
        return waiter

    @property
    def celery(self) -> Celery:
        """The producer's Celery app (it builds the messages; `VirtualServer.celery`)."""
        if self._celery is None:
            self._celery = producer_app(self.endpoint, self.timeout, self.sent_events)
        return self._celery

    # -- hosts ---------------------------------------------------------------

    async def _live_heartbeats(self) -> dict[str, str]:
        async with broker_errors(self.url):
            reply = await self.store.scripts.hosts_live(**taskcalls.hosts_arguments())
        return taskcalls.live_hosts_of(reply)

    @property
    def hosts(self) -> Awaitable[list[str]]:
        """``await server.hosts``: names of the hosts whose worker heartbeat is live."""
        return self._hosts()

    async def _hosts(self) -> list[str]:
        return list(await self._live_heartbeats())

    async def host_status(self) -> dict[str, dict[str, Any]]:
        """`VirtualServer.host_status`: each live host's last heartbeat, with
        ``maintenance``, in one round trip."""
        def build(pipe: Any) -> None:
            self.store.scripts.hosts_live.queue(pipe, **taskcalls.hosts_arguments())
            pipe.hgetall(keys.MAINTENANCE)

        async with broker_errors(self.url):
            reply, held = await pipelined(self.redis, build, self.store.scripts)
        return {name: {**json.loads(beat), "maintenance": name in held}
                for name, beat in taskcalls.live_hosts_of(reply).items()}

    async def resolve_host(self, host: str | None = None) -> str:
        """`VirtualServer.resolve_host`: explicit, configured, or the only live host."""
        wanted = host or self.default_host
        if wanted is not None:
            validate_host_name(wanted)
            async with broker_errors(self.url):
                live_now = await self.redis.exists(keys.host_heartbeat(wanted))
            if not live_now:
                raise host_not_live(wanted, await self._hosts())
            return wanted
        return only_host(await self._hosts())

    # -- tasks ---------------------------------------------------------------

    async def get_task(self, task_id: str) -> AsyncVMTask:
        """Re-attach to a task; `TaskNotFoundError` if unknown."""
        check_task_id(task_id)
        task = AsyncVMTask(self, task_id)
        await task.snapshot()
        return task

    def _queue(self, spec: TaskSpec, description: str, kwargs: dict[str, Any],
               host: str | None) -> Awaitable[AsyncVMTask]:
        return self.submit(spec, description=description, kwargs=kwargs, host=host)

    async def submit(self, task: TaskSpec | str, *, description: str,
                     cancelable: bool | None = None, kwargs: dict[str, Any] | None = None,
                     host: str | None = None, args: Sequence[Any] = (),
                     task_id: str | None = None) -> AsyncVMTask:
        """`VirtualServer.submit`: record and enqueue one operation, one round trip.

        Building a message is CPU work without an await: thousands of submits started
        at once take turns (`SUBMITS_AT_ONCE`), so the loop still serves the
        connections they wait on (a connect starved for seconds timed out)."""
        if self._submitting is None:
            self._submitting = asyncio.Semaphore(SUBMITS_AT_ONCE)
        async with self._submitting:
            return await self._submit(task, description=description, cancelable=cancelable,
                                      kwargs=kwargs, host=host, args=args, task_id=task_id)

    async def _submit(self, task: TaskSpec | str, *, description: str,
                      cancelable: bool | None, kwargs: dict[str, Any] | None,
                      host: str | None, args: Sequence[Any],
                      task_id: str | None) -> AsyncVMTask:
        plan = prepare(task, description=description, cancelable=cancelable, kwargs=kwargs,
                       args=args, task_id=task_id)
        wanted = host or self.default_host
        if wanted is not None:
            validate_host_name(wanted)
        target = wanted or self._only_host or await self.resolve_host(None)
        for attempt in (1, 2):
            message = plan.message(self.celery, target, self.url)
            if await self.store.create(plan.task_id, host=target, message=message,
                                       **plan.record):
                self._only_host = None if wanted else target
                return AsyncVMTask(self, plan.task_id, host=target,
                                   description=plan.description)
            if wanted is not None:
                await self.resolve_host(wanted)  # raises, naming the live hosts
            self._only_host = None
            if attempt == 1:
                target = await self.resolve_host(None)
        raise HostUnavailableError(f"Host {target} stopped being live")

    async def task_snapshots(self, ids: Sequence[str]) -> list[TaskSnapshot | None]:
        if isinstance(ids, str) or not all(isinstance(i, str) for i in ids):
            raise InvalidArgumentError("ids must be a sequence of task id strings")
        return await self.store.read_many(list(ids))

    async def tasks(self, state: str | None = None, host: str | None = None,
                    limit: int = 50) -> list[TaskSnapshot]:
        """`VirtualServer.tasks`: recent tasks, newest first."""
        check_int("limit", limit, 1, 10_000)
        if host is not None:
            validate_host_name(host)
        if state is not None and state not in ALL_STATES:
            raise InvalidArgumentError(f"state must be one of {sorted(ALL_STATES)}, not {state!r}")
        ids = await self.store.matching(state, host, limit, MAX_SCAN)
        return [snap for snap in await self.store.read_many(ids) if snap is not None]

    # -- waiting for many ----------------------------------------------------

    def completions(self, task_ids: Sequence[str],
                    deadline: float | None) -> AsyncGenerator[str, None]:
        return completions(self.store, self.waiter, task_ids, deadline, self.poll_interval)

    async def wait_all(self, tasks: Iterable[AsyncVMTask], timeout_ms: int = -1) -> bool:
        """True once every task is complete, False at ``timeout_ms`` (-1: forever;
        0: look once).  One pub/sub connection, however many tasks."""
        try:
            async with contextlib.aclosing(self.as_completed(tasks, timeout_ms)) as done:
                async for _ in done:
                    pass
        except TimeoutError:
            return False
        return True

    def as_completed(self, tasks: Iterable[AsyncVMTask],
                     timeout_ms: int = -1) -> AsyncGenerator[AsyncVMTask, None]:
        """Each task as it completes, in completion order; `TimeoutError` when
        ``timeout_ms`` passes first.  Bad input is refused before the first await."""
        by_id = task_ids_of(tasks, AsyncVMTask)
        validate_timeout(timeout_ms)
        return self._completed(by_id, timeout_ms)

    async def _completed(self, by_id: dict[str, AsyncVMTask],
                         timeout_ms: int) -> AsyncGenerator[AsyncVMTask, None]:
        deadline = None if timeout_ms == WAIT_FOREVER else time.monotonic() + timeout_ms / 1000
        left = len(by_id)
        async with contextlib.aclosing(self.completions(list(by_id), deadline)) as done:
            async for task_id in done:
                left -= 1
                yield by_id[task_id]
        if left:
            raise TimeoutError(f"{left} of {len(by_id)} task(s) not complete after "
                               f"{timeout_ms} ms")
