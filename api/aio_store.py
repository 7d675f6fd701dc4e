"""Task records for the asyncio producer: `TaskStore`'s calls over ``redis.asyncio``.

The calls themselves (their keyword arguments, what a reply means) are
`api.protocol.taskcalls` and `api.protocol.records`, shared with the sync store, and
sent by the same registry's lines (`api.scripts.AsyncScripts`); only the sending is
here.  The commands of one server go over a small pool (`COMMAND_CONNECTIONS`):
however many coroutines call at once, they queue for a connection rather than open
one each.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff, NoBackoff

from api.connection import RedisEndpoint
from api.errors import BrokerUnavailableError, TaskNotFoundError
from api.protocol import keys, records, taskcalls, tasklog
from api.protocol.records import Field, TaskSnapshot
from api.protocol.taskcalls import PublishCommand
from api.replication import Acknowledgement
from api.scripts import AsyncScripts, WholeScripts
from api.store import ACCESS_ERRORS, CONNECTION_ERRORS, access_denied, cancelled, found, withdrawn

log = logging.getLogger(__name__)

COMMAND_CONNECTIONS = 2  # at most this many command connections per server


def async_client(endpoint: RedisEndpoint, timeout: float,
                 max_connections: int = COMMAND_CONNECTIONS,
                 retry: Retry | None = None) -> aioredis.Redis:
    """A ``redis.asyncio`` client of ``endpoint``, as `RedisEndpoint.client` makes a
    sync one: calls fail after ``timeout`` s; with Sentinel, each new connection asks
    the sentinels for the primary; refused or cut connections are retried for
    ``failover_seconds``."""
    options: dict[str, Any] = {"decode_responses": True, "socket_timeout": timeout,
                               "socket_connect_timeout": timeout, "socket_keepalive": True,
                               "health_check_interval": 30}
    if retry is not None:
        options["retry"] = retry
    elif endpoint.failover_seconds > 0:
        retries = 4 + int(max(0.0, endpoint.failover_seconds - 0.75) / 0.5)
        options["retry"] = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries)
    else:
        # One immediate retry (a pooled connection that a restart cut), not redis-py's
        # default of three with up to 10 s between: the waits ride outages out themselves.
        options["retry"] = Retry(NoBackoff(), 1)
    if endpoint.sentinel is not None:
        target = endpoint.sentinel
        manager = Sentinel(list(target.sentinels),
                           sentinel_kwargs={"socket_timeout": timeout,
                                            "socket_connect_timeout": timeout})
        client: aioredis.Redis = manager.master_for(
            target.master, db=target.db, username=target.username, password=target.password,
            max_connections=max_connections, **options)
        return client
    pool = aioredis.BlockingConnectionPool.from_url(
        endpoint.url, max_connections=max_connections, timeout=None,
        **dict(endpoint.tls or {}), **options)
    return aioredis.Redis(connection_pool=pool)


@asynccontextmanager
async def broker_errors(url: str) -> AsyncIterator[None]:
    """`api.store.broker_errors` for coroutines."""
    try:
        yield
    except ACCESS_ERRORS as exc:
        raise access_denied(url, exc) from None
    except CONNECTION_ERRORS as exc:
        raise BrokerUnavailableError(f"Redis cannot be reached: {exc}") from None


async def pipelined(client: aioredis.Redis, build: Callable[[Any], None],
                    scripts: Iterable[Any]) -> list[Any]:
    """`api.replication.pipelined` for coroutines: ``build``'s commands in one round
    trip, sent again with the scripts' bodies if the server lacked one."""
    pipe = client.pipeline(transaction=False)
    build(pipe)
    try:
        return list(await pipe.execute())
    except redis.exceptions.NoScriptError:
        log.info("Redis did not have our scripts cached (a new primary?): sending them whole")
    pipe = client.pipeline(transaction=False)
    build(WholeScripts(pipe, scripts))
    return list(await pipe.execute())


class AsyncTaskStore:
    """`api.store.TaskStore`'s producer calls, awaitable."""

    def __init__(self, client: aioredis.Redis, url: str, retention_seconds: float,
                 endpoint: RedisEndpoint, lease_seconds: float = 15.0) -> None:
        self.client = client
        self.url = url
        self.retention_seconds = int(retention_seconds)
        self.lease_seconds = lease_seconds
        self.ack = Acknowledgement(endpoint.wait_replicas, endpoint.wait_ms)
        self.scripts = AsyncScripts.of(client)

    async def create(self, task_id: str, *, name: str, description: str, host: str,
                     cancelable: bool, arguments: dict[str, Any],
                     message: Sequence[PublishCommand] = (),
                     extra: dict[str, str] | None = None) -> bool:
        """`TaskStore.create`: record and message in one script, one round trip."""
        call = taskcalls.submit_arguments(
            task_id, name=name, description=description, host=host, cancelable=cancelable,
            arguments=arguments, message=message, extra=extra)
        if self.ack.replicas <= 0:
            async with broker_errors(self.url):
                (live,) = await pipelined(
                    self.client, lambda pipe: self.scripts.task_submit.queue(pipe, **call),
                    self.scripts)
            return bool(live)
        wanted = self.ack.wanted()

        def with_wait(pipe: Any) -> None:
            self.scripts.task_submit.queue(pipe, **call)
            pipe.execute_command("ROLE")
            pipe.execute_command("WAIT", wanted, self.ack.wait_ms)

        try:
            live, role, acked = await pipelined(self.client, with_wait, self.scripts)
            self.ack.connected, enough = taskcalls.acknowledged(role, acked, wanted)
        except CONNECTION_ERRORS:
            live, enough = 1, False  # unknown: take it back, if it arrived at all
        if live and not enough:
            async with broker_errors(self.url):
                outcome = await self.scripts.task_withdraw(
                    **taskcalls.withdraw_arguments(task_id, self.retention_seconds))
            withdrawn(name, outcome)
        return bool(live)

    async def read(self, task_id: str) -> TaskSnapshot:
        """One round trip; judges a lease-less running task crashed."""
        snapshot = await self._read_once(task_id)
        if snapshot.is_crashed_candidate and await self.judge_crashed(task_id):
            snapshot = await self._read_once(task_id)
        return snapshot

    async def _read_once(self, task_id: str) -> TaskSnapshot:
        async with broker_errors(self.url):
            reply = await self.scripts.task_read(**taskcalls.read_arguments(task_id))
        return found(task_id, taskcalls.snapshot_of(task_id, reply))

    async def read_many(self, task_ids: Sequence[str]) -> list[TaskSnapshot | None]:
        if not task_ids:
            return []

        def build(pipe: Any) -> None:
            for task_id in task_ids:
                self.scripts.task_read.queue(pipe, **taskcalls.read_arguments(task_id))

        async with broker_errors(self.url):
            replies = await pipelined(self.client, build, self.scripts)
        return [taskcalls.snapshot_of(task_id, reply)
                for task_id, reply in zip(task_ids, replies, strict=True)]

    async def worth_reading(self, task_ids: Sequence[str]) -> list[str]:
        """Of ``task_ids``, those whose record is complete, gone, or started without a
        live lease (to be judged): the state and the lease only, one pipeline, so a
        poll of thousands of waits costs little to parse."""
        async with broker_errors(self.url):
            pipe = self.client.pipeline(transaction=False)
            for task_id in task_ids:
                pipe.hget(keys.task_record(task_id), Field.STATE)
                pipe.exists(keys.task_lease(task_id))
            replies = await pipe.execute()
        return [task_id for task_id, state, lease in
                zip(task_ids, replies[::2], replies[1::2], strict=True)
                if state is None or state in records.COMPLETE_STATES
                or (state == records.STARTED and not lease)]

    async def judge_crashed(self, task_id: str) -> bool:
        """`records.judge_crashed`: a task whose lease expired ends with
        ThreadCrashError, and a composite one's children are cancelled."""
        async with broker_errors(self.url):
            outcome = await self.scripts.task_finish(**records.judge_arguments(
                task_id, self.retention_seconds, self.lease_seconds))
            if outcome != "OK":
                return False
            children = records.children_of(
                await self.client.hget(keys.task_record(task_id), Field.CHILDREN))
            for child in children:
                await self.scripts.task_cancel(
                    **records.cancel_arguments(child, self.retention_seconds))
        return True

    async def cancel(self, task_id: str) -> str:
        async with broker_errors(self.url):
            outcome = await self.scripts.task_cancel(
                **records.cancel_arguments(task_id, self.retention_seconds))
        return cancelled(task_id, outcome)

    async def matching(self, state: str | None, host: str | None, limit: int,
                       horizon: int) -> list[str]:
        async with broker_errors(self.url):
            ids = await self.scripts.task_list(
                **records.list_arguments(state, host, limit, horizon))
        return [str(task_id) for task_id in ids]

    async def log(self, task_id: str, tail: int | None = None) -> list[str]:
        async with broker_errors(self.url):
            reply = await self.scripts.task_log_read(**taskcalls.log_arguments(task_id, tail=tail))
        if not reply:
            raise TaskNotFoundError(f"No task with id {task_id!r} (unknown, or expired)")
        _first, *raw = reply
        return [tasklog.format_entry(tasklog.decode(item)) for item in raw]
