"""Task records for the asyncio producer: `TaskStore`'s calls over ``redis.asyncio``.

The calls themselves (keys, arguments, what a reply means) are
`api.protocol.taskcalls`, shared with the sync store; only the sending is here.
The commands of one server go over a small pool (`COMMAND_CONNECTIONS`): however
many coroutines call at once, they queue for a connection rather than open one each.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from hashlib import sha1
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff, NoBackoff

from api.connection import RedisEndpoint
from api.errors import BrokerUnavailableError, TaskNotFoundError
from api.protocol import keys, records, scripts, taskcalls, tasklog
from api.protocol.records import TaskSnapshot
from api.protocol.taskcalls import Call, PublishCommand
from api.replication import Acknowledgement
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


class AsyncScript:
    """A Lua script called by EVALSHA, sent by body (EVAL) to a server that lacks it
    (a new primary), as `api.replication.LuaScript` does."""

    def __init__(self, body: str) -> None:
        self.body = body
        self.sha = sha1(body.encode("utf-8")).hexdigest()

    async def __call__(self, client: Any, call: Call) -> Any:
        record_keys, args = call
        try:
            return await client.evalsha(self.sha, len(record_keys), *record_keys, *args)
        except redis.exceptions.NoScriptError:
            return await client.eval(self.body, len(record_keys), *record_keys, *args)

    def queue(self, pipe: Any, call: Call, whole: bool) -> None:
        record_keys, args = call
        if whole:
            pipe.eval(self.body, len(record_keys), *record_keys, *args)
        else:
            pipe.evalsha(self.sha, len(record_keys), *record_keys, *args)


async def pipelined(client: aioredis.Redis,
                    calls: Sequence[tuple[AsyncScript, Call]],
                    extra: Callable[[Any], None] | None = None) -> list[Any]:
    """Every call in one round trip; sent again by body if a script was missing."""
    for whole in (False, True):
        pipe = client.pipeline(transaction=False)
        for script, call in calls:
            script.queue(pipe, call, whole)
        if extra is not None:
            extra(pipe)
        try:
            return list(await pipe.execute())
        except redis.exceptions.NoScriptError:
            log.info("Redis did not have our scripts cached (a new primary?): sending them")
    raise AssertionError("unreachable")


class AsyncTaskStore:
    """`api.store.TaskStore`'s producer calls, awaitable."""

    def __init__(self, client: aioredis.Redis, url: str, retention_seconds: float,
                 endpoint: RedisEndpoint, lease_seconds: float = 15.0) -> None:
        self.client = client
        self.url = url
        self.retention_seconds = int(retention_seconds)
        self.lease_seconds = lease_seconds
        self.ack = Acknowledgement(endpoint.wait_replicas, endpoint.wait_ms)
        self._submit = AsyncScript(records.SUBMIT_SCRIPT)
        self._read = AsyncScript(records.READ_SCRIPT)
        self._cancel = AsyncScript(records.CANCEL_SCRIPT)
        self._finish = AsyncScript(records.FINISH_SCRIPT)
        self._withdraw = AsyncScript(records.WITHDRAW_SCRIPT)
        self._list = AsyncScript(records.LIST_SCRIPT)
        self._log_read = AsyncScript(tasklog.READ_SCRIPT)
        self.hosts_live = AsyncScript(scripts.load("hosts_live"))

    async def create(self, task_id: str, *, name: str, description: str, host: str,
                     cancelable: bool, arguments: dict[str, Any],
                     message: Sequence[PublishCommand] = ()) -> bool:
        """`TaskStore.create`: record and message in one script, one round trip."""
        call = taskcalls.submit(task_id, name=name, description=description, host=host,
                                cancelable=cancelable, arguments=arguments, message=message)
        if self.ack.replicas <= 0:
            async with broker_errors(self.url):
                (live,) = await pipelined(self.client, [(self._submit, call)])
            return bool(live)
        wanted = self.ack.wanted()

        def wait(pipe: Any) -> None:
            pipe.execute_command("ROLE")
            pipe.execute_command("WAIT", wanted, self.ack.wait_ms)

        try:
            live, role, acked = await pipelined(self.client, [(self._submit, call)], wait)
            self.ack.connected, enough = taskcalls.acknowledged(role, acked, wanted)
        except CONNECTION_ERRORS:
            live, enough = 1, False  # unknown: take it back, if it arrived at all
        if live and not enough:
            async with broker_errors(self.url):
                outcome = await self._withdraw(
                    self.client, taskcalls.withdraw(task_id, self.retention_seconds))
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
            reply = await self._read(self.client, taskcalls.read(task_id))
        return found(task_id, taskcalls.snapshot_of(task_id, reply))

    async def read_many(self, task_ids: Sequence[str]) -> list[TaskSnapshot | None]:
        if not task_ids:
            return []
        async with broker_errors(self.url):
            replies = await pipelined(
                self.client, [(self._read, taskcalls.read(task_id)) for task_id in task_ids])
        return [taskcalls.snapshot_of(task_id, reply)
                for task_id, reply in zip(task_ids, replies, strict=True)]

    async def worth_reading(self, task_ids: Sequence[str]) -> list[str]:
        """Of ``task_ids``, those whose record is complete, gone, or started without a
        live lease (to be judged): the state and the lease only, one pipeline, so a
        poll of thousands of waits costs little to parse."""
        async with broker_errors(self.url):
            pipe = self.client.pipeline(transaction=False)
            for task_id in task_ids:
                pipe.hget(keys.task_record(task_id), "state")
                pipe.exists(keys.task_lease(task_id))
            replies = await pipe.execute()
        return [task_id for task_id, state, lease in
                zip(task_ids, replies[::2], replies[1::2], strict=True)
                if state is None or state in records.COMPLETE_STATES
                or (state == records.STARTED and not lease)]

    async def judge_crashed(self, task_id: str) -> bool:
        async with broker_errors(self.url):
            outcome = await self._finish(self.client, taskcalls.judge_crashed(
                task_id, self.retention_seconds, self.lease_seconds))
        return bool(outcome == "OK")

    async def cancel(self, task_id: str) -> str:
        async with broker_errors(self.url):
            outcome = await self._cancel(
                self.client, taskcalls.cancel(task_id, self.retention_seconds))
        return cancelled(task_id, outcome)

    async def matching(self, state: str | None, host: str | None, limit: int,
                       horizon: int) -> list[str]:
        async with broker_errors(self.url):
            found = await self._list(self.client,
                                     taskcalls.matching(state, host, limit, horizon))
        return [str(task_id) for task_id in found]

    async def log(self, task_id: str, tail: int | None = None) -> list[str]:
        async with broker_errors(self.url):
            reply = await self._log_read(self.client, (
                [keys.task_record(task_id), keys.task_log(task_id)],
                [0, "" if tail is None else tail]))
        if not reply:
            raise TaskNotFoundError(f"No task with id {task_id!r} (unknown, or expired)")
        _first, *raw = reply
        return [tasklog.format_entry(tasklog.decode(item)) for item in raw]

