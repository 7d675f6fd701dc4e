"""Reads and writes task records for the producer: one round trip per call.

`TaskStore` is the only producer code that touches task keys; `VMTask` and
`VirtualServer` go through it.  Redis connection failures surface as
`errors.BrokerUnavailableError`, never as redis-py exceptions.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import redis
from kombu.exceptions import OperationalError

from api.connection import RedisEndpoint, parse_redis_url, redact_url
from api.enums import VMTaskResult
from api.errors import BrokerUnavailableError, TaskNotCancelableError, TaskNotFoundError
from api.protocol import hresults, keys, records
from api.protocol.records import TaskSnapshot

# A TLS handshake that fails (wrong CA, wrong client certificate) and a refused
# login are ConnectionErrors too; an ACL that forbids a command is NoPermissionError.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError)
REFUSED_ERRORS: tuple[type[Exception], ...] = (*CONNECTION_ERRORS,
                                               redis.exceptions.NoPermissionError)
# What kombu's publish raises when Redis is away or refuses the producer.
SEND_ERRORS: tuple[type[Exception], ...] = (OperationalError, *REFUSED_ERRORS)
PENDING_RECORD_TTL_SECONDS = 30 * 86400  # a queued task may wait for a host that is down
MAX_RECENT_TASKS = 100_000


def connect(endpoint: RedisEndpoint | str, timeout: float = 5.0) -> redis.Redis:
    """A client whose every call fails after ``timeout`` seconds rather than hang
    (a Redis stopped with SIGSTOP accepts connections and never answers)."""
    if isinstance(endpoint, str):
        endpoint = parse_redis_url(endpoint)
    return endpoint.client(
        timeout,
        decode_responses=True,
        socket_keepalive=True,
        health_check_interval=30,
    )


@contextmanager
def broker_errors(url: str) -> Iterator[None]:
    """Turn redis-py connection failures into `BrokerUnavailableError`."""
    try:
        yield
    except redis.exceptions.NoPermissionError as exc:
        raise BrokerUnavailableError(
            f"Redis at {redact_url(url)} refused a command to this user (ACL): {exc}"
        ) from None
    except CONNECTION_ERRORS as exc:
        raise BrokerUnavailableError(
            f"Redis at {redact_url(url)} cannot be reached: {exc}"
        ) from None


class TaskStore:
    def __init__(self, client: redis.Redis, url: str, retention_seconds: float) -> None:
        self.client = client
        self.url = url
        self.retention_seconds = int(retention_seconds)
        self._finish = client.register_script(records.FINISH_SCRIPT)
        self._cancel = client.register_script(records.CANCEL_SCRIPT)
        # One pub/sub connection per thread, reused across waits: opening one per
        # wait costs a TCP handshake and an AUTH each time.
        self._local = threading.local()

    def subscription(self) -> Any:
        pubsub = getattr(self._local, "pubsub", None)
        if pubsub is None:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            self._local.pubsub = pubsub
        return pubsub

    def release_subscription(self, channel: str) -> None:
        pubsub = getattr(self._local, "pubsub", None)
        if pubsub is None:
            return
        try:
            pubsub.unsubscribe(channel)
        except CONNECTION_ERRORS:
            self.drop_subscription()

    def drop_subscription(self) -> None:
        pubsub = getattr(self._local, "pubsub", None)
        self._local.pubsub = None
        if pubsub is not None:
            try:
                pubsub.close()
            except CONNECTION_ERRORS:
                pass

    def create(
        self,
        task_id: str,
        *,
        name: str,
        description: str,
        host: str,
        cancelable: bool,
        arguments: Mapping[str, Any],
    ) -> None:
        now = time.time()
        with broker_errors(self.url):
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(
                keys.task_record(task_id),
                mapping={
                    "name": name,
                    "description": description,
                    "host": host,
                    "cancelable": "1" if cancelable else "0",
                    "state": records.PENDING,
                    "percent": "0",
                    "created": repr(now),
                    "arguments": json.dumps(dict(arguments), sort_keys=True),
                },
            )
            pipe.expire(keys.task_record(task_id), PENDING_RECORD_TTL_SECONDS)
            pipe.zadd(keys.RECENT_TASKS, {task_id: now})
            # The index of recent tasks is bounded by age and by count, like the records.
            pipe.zremrangebyscore(keys.RECENT_TASKS, "-inf", now - self.retention_seconds)
            pipe.zremrangebyrank(keys.RECENT_TASKS, 0, -MAX_RECENT_TASKS - 1)
            pipe.execute()

    def discard(self, task_id: str) -> None:
        """Forget a record whose message could not be sent."""
        with broker_errors(self.url):
            self.client.delete(keys.task_record(task_id))
            self.client.zrem(keys.RECENT_TASKS, task_id)

    def read(self, task_id: str) -> TaskSnapshot:
        """One pipelined round trip; judges a lease-less running task crashed."""
        snapshot = self._read_once(task_id)
        if snapshot.is_crashed_candidate and self.judge_crashed(task_id):
            snapshot = self._read_once(task_id)
        return snapshot

    def _read_once(self, task_id: str) -> TaskSnapshot:
        with broker_errors(self.url):
            pipe = self.client.pipeline(transaction=True)
            pipe.hgetall(keys.task_record(task_id))
            pipe.exists(keys.task_lease(task_id))
            fields, lease = pipe.execute()
        if not fields:
            raise TaskNotFoundError(f"No task with id {task_id!r} (unknown, or expired)")
        return TaskSnapshot.from_record(task_id, fields, bool(lease))

    def read_many(self, task_ids: Sequence[str]) -> list[TaskSnapshot]:
        with broker_errors(self.url):
            pipe = self.client.pipeline(transaction=False)
            for task_id in task_ids:
                pipe.hgetall(keys.task_record(task_id))
                pipe.exists(keys.task_lease(task_id))
            replies = pipe.execute()
        return [
            TaskSnapshot.from_record(task_id, fields, bool(lease))
            for task_id, fields, lease in zip(task_ids, replies[::2], replies[1::2], strict=True)
            if fields
        ]

    def recent(self, limit: int) -> list[str]:
        """Ids of the newest tasks first."""
        with broker_errors(self.url):
            return list(self.client.zrevrange(keys.RECENT_TASKS, 0, limit - 1))

    def judge_crashed(self, task_id: str) -> bool:
        """End a started task whose lease expired with ThreadCrashError; True if it did."""
        with broker_errors(self.url):
            return judge_crashed(self.client, self._finish, task_id, self.retention_seconds)

    def cancel(self, task_id: str) -> str:
        with broker_errors(self.url):
            outcome = self._cancel(
                keys=[keys.task_record(task_id), keys.task_channel(task_id)],
                args=[repr(time.time()), self.retention_seconds, int(VMTaskResult.Cancelled),
                      hresults.E_ABORT],
            )
        if outcome == "MISSING":
            raise TaskNotFoundError(f"No task with id {task_id!r} (unknown, or expired)")
        if outcome == "NOT_CANCELABLE":
            raise TaskNotCancelableError(f"Task {task_id} cannot be cancelled")
        if outcome == "COMPLETE":
            raise TaskNotCancelableError(f"Task {task_id} is already complete")
        return str(outcome)


def judge_crashed(
    client: redis.Redis, finish_script: Any, task_id: str, retention_seconds: int
) -> bool:
    """Shared by producers and workers' reapers: the script re-checks the lease atomically."""
    outcome = finish_script(
        keys=[
            keys.task_record(task_id),
            keys.task_lease(task_id),
            keys.RUNNING_TASKS,
            keys.task_channel(task_id),
        ],
        args=[
            records.FAILURE,
            int(VMTaskResult.ThreadCrashError),
            hresults.SERVER_FAULT,
            "The worker running the task stopped (killed, out of memory, or host lost)",
            repr(time.time()),
            0,
            retention_seconds,
            task_id,
            "1",
            "",
        ],
    )
    return bool(outcome == "OK")
