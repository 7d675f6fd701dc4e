"""Reads and writes task records for the producer: one round trip per call.

`TaskStore` is the only producer code that touches task keys; `VMTask` and
`VirtualServer` go through it.  Redis connection failures surface as
`errors.BrokerUnavailableError`, never as redis-py exceptions.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import redis
from kombu.exceptions import BatchPublishError, OperationalError

from api.connection import RedisEndpoint, no_retry, parse_redis_url, redact_url
from api.errors import (
    BrokerAccessDeniedError,
    BrokerUnavailableError,
    TaskNotCancelableError,
    TaskNotFoundError,
)
from api.protocol import taskcalls, tasklog
from api.protocol.records import (
    TaskSnapshot,
    cancel_record,
    judge_crashed,
    matching_tasks,
)
from api.protocol.taskcalls import PublishCommand
from api.replication import Acknowledgement, pipelined, replicated
from api.scripts import Scripts

if TYPE_CHECKING:
    from api.waiter import TaskWaiter

# A TLS handshake that fails (wrong CA, wrong client certificate) and a refused
# login are ConnectionErrors too; an ACL that forbids a command is NoPermissionError.
CONNECTION_ERRORS: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError)
REFUSED_ERRORS: tuple[type[Exception], ...] = (*CONNECTION_ERRORS,
                                               redis.exceptions.NoPermissionError)
# Redis answered and said no: a login refused (wrong or missing password, unknown or
# disabled user) or an ACL without the command.  redis-py makes the first two
# ConnectionErrors, so every retry loop that catches those must ask `refusal_of`.
ACCESS_ERRORS: tuple[type[Exception], ...] = (redis.exceptions.AuthenticationError,
                                              redis.exceptions.AuthorizationError,
                                              redis.exceptions.NoPermissionError)
# What kombu's publish raises when Redis is away or refuses the producer; a batch
# cut by a failover is "delivery uncertain": the record is then removed, so a
# message that did arrive meets no record at the start gate and never runs.
SEND_ERRORS: tuple[type[Exception], ...] = (OperationalError, BatchPublishError,
                                            *REFUSED_ERRORS)


def connect(endpoint: RedisEndpoint | str, timeout: float = 5.0, **options: Any) -> redis.Redis:
    """A client whose every call fails after ``timeout`` seconds rather than hang
    (a Redis stopped with SIGSTOP accepts connections and never answers)."""
    if isinstance(endpoint, str):
        endpoint = parse_redis_url(endpoint)
    return endpoint.client(
        timeout,
        decode_responses=True,
        socket_keepalive=True,
        health_check_interval=30,
        **options,
    )


def refusal_of(exc: BaseException | None) -> BaseException | None:
    """The login or ACL refusal behind ``exc`` (kombu wraps redis-py's), if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ACCESS_ERRORS):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def access_denied(url: str, refusal: BaseException, doing: str = "") -> BrokerAccessDeniedError:
    what = ("refused a command to this user (ACL)"
            if isinstance(refusal, redis.exceptions.NoPermissionError)
            else "refused the login (password or user)")
    return BrokerAccessDeniedError(f"{doing}Redis at {redact_url(url)} {what}: {refusal}")


@contextmanager
def broker_errors(url: str) -> Iterator[None]:
    """Turn redis-py connection failures into `BrokerUnavailableError`, and a refused
    login or command into `BrokerAccessDeniedError`."""
    try:
        yield
    except ACCESS_ERRORS as exc:
        raise access_denied(url, exc) from None
    except CONNECTION_ERRORS as exc:
        raise BrokerUnavailableError(
            f"Redis at {redact_url(url)} cannot be reached: {exc}"
        ) from None


class TaskStore:
    def __init__(self, client: redis.Redis, url: str, retention_seconds: float,
                 endpoint: RedisEndpoint | None = None, timeout: float = 5.0,
                 lease_seconds: float = 15.0) -> None:
        self.client = client
        self.url = url
        self._endpoint, self._timeout = endpoint, timeout
        self.retention_seconds = int(retention_seconds)
        self.lease_seconds = lease_seconds
        # Replica acknowledgement of a submit (`create`): on a client that never
        # retries, because a WAIT re-sent to a new primary would vouch for writes
        # that the dead one may have taken with it.
        self.ack = Acknowledgement(endpoint.wait_replicas if endpoint is not None else 0,
                                   endpoint.wait_ms if endpoint is not None else 0)
        self._ack_client = (connect(endpoint, timeout, retry=no_retry())
                            if endpoint is not None and self.ack.replicas else None)
        self.scripts = Scripts.of(client)
        # Monitoring hooks (Celery events for Flower), set by whoever owns a Celery app.
        self.on_revoked: Callable[[str], None] | None = None
        self.on_crash_judged: Callable[[str], None] | None = None
        # One pub/sub connection per thread for task logs followed; every wait of
        # this store shares the waiter's one connection instead.
        self._local = threading.local()
        self._waiter: TaskWaiter | None = None
        self._waiter_lock = threading.Lock()

    @property
    def waiter(self) -> TaskWaiter:
        """The one pub/sub connection (and its reader thread) of every wait."""
        with self._waiter_lock:
            if self._waiter is None:
                from api.waiter import TaskWaiter  # api.waiter reads records through us

                # Its own connection, never retried by redis-py (whose default waits
                # up to 10 s between tries): the waiter reconnects, within a second.
                client = (connect(self._endpoint, self._timeout, retry=no_retry())
                          if self._endpoint is not None else self.client)
                self._waiter = TaskWaiter(client, owns_client=client is not self.client)
            return self._waiter

    def subscription(self) -> Any:
        pubsub = getattr(self._local, "pubsub", None)
        if pubsub is None:
            pubsub = self.client.pubsub(ignore_subscribe_messages=False)
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
        message: Sequence[PublishCommand] = (),
        extra: Mapping[str, str] | None = None,
    ) -> bool:
        """Write a PENDING record and push its ``message`` (the Redis commands kombu
        would send for it) in one script, one round trip: both or neither.  O(1)
        whatever the fleet: the host's heartbeat, the record, two index entries.  False
        when ``host`` has no live worker; then nothing was written.

        With replica acknowledgement wanted, the same round trip WAITs for it.  A
        submit no replica acknowledged, or whose reply was lost, is withdrawn
        (`withdraw_unconfirmed`) and raises `BrokerUnavailableError`.
        """
        call = taskcalls.submit_arguments(
            task_id, name=name, description=description, host=host, cancelable=cancelable,
            arguments=arguments, message=message, extra=extra)

        def build(pipe: Any) -> None:
            self.scripts.task_submit.queue(pipe, **call)

        if self._ack_client is None:
            with broker_errors(self.url):
                (live,) = pipelined(self.client, build, self.scripts)
            return bool(live)
        try:
            (live,), acked = replicated(self._ack_client, build, self.scripts, self.ack)
        except CONNECTION_ERRORS:
            live, acked = 1, False  # unknown: take it back, if it arrived at all
        if live and not acked:
            self.withdraw_unconfirmed(task_id, name)
        return bool(live)

    def withdraw_unconfirmed(self, task_id: str, name: str) -> None:
        """A submit no replica acknowledged in time is taken back if no worker took it
        yet, and raises `BrokerUnavailableError`; if a worker did take it, it runs and
        its record says so, and the submit stands."""
        with broker_errors(self.url):
            outcome = self.scripts.task_withdraw(
                **taskcalls.withdraw_arguments(task_id, self.retention_seconds))
        withdrawn(name, outcome)

    def close(self) -> None:
        self.drop_subscription()
        with self._waiter_lock:
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.close()
        if self._ack_client is not None:
            self._ack_client.close()

    def read(self, task_id: str) -> TaskSnapshot:
        """One round trip; judges a lease-less running task crashed."""
        snapshot = self._read_once(task_id)
        if snapshot.is_crashed_candidate and self.judge_crashed(task_id):
            snapshot = self._read_once(task_id)
        return snapshot

    def _read_once(self, task_id: str) -> TaskSnapshot:
        with broker_errors(self.url):
            reply = self.scripts.task_read(**taskcalls.read_arguments(task_id))
        return found(task_id, taskcalls.snapshot_of(task_id, reply))

    def read_many(self, task_ids: Sequence[str]) -> list[TaskSnapshot | None]:
        """Every task's snapshot in one pipelined round trip, in order; None if unknown.

        No crash judgment here: a lease-less STARTED task reads as it is recorded.
        """
        if not task_ids:
            return []

        def build(pipe: Any) -> None:
            for task_id in task_ids:
                self.scripts.task_read.queue(pipe, **taskcalls.read_arguments(task_id))

        with broker_errors(self.url):
            replies = pipelined(self.client, build, self.scripts)
        return [taskcalls.snapshot_of(task_id, reply)
                for task_id, reply in zip(task_ids, replies, strict=True)]

    def log(self, task_id: str, tail: int | None = None) -> list[str]:
        """The task's log lines, oldest first (the last ``tail`` only, if given), in
        one round trip; `TaskNotFoundError` once the record is gone."""
        _first, entries = self.log_entries(task_id, tail=tail)
        return [tasklog.format_entry(fields) for fields in entries]

    def log_entries(self, task_id: str, *, after: int = 0,
                    tail: int | None = None) -> tuple[int, list[dict[str, Any]]]:
        """The number of the first entry returned, and the log's entries, oldest
        first: those numbered after ``after``, the last ``tail`` of them at most."""
        with broker_errors(self.url):
            reply = self.scripts.task_log_read(**taskcalls.log_arguments(task_id, after, tail))
        if not reply:
            raise TaskNotFoundError(f"No task with id {task_id!r} (unknown, or expired)")
        first, *raw = reply
        return int(first), [tasklog.decode(item) for item in raw]

    def matching(self, state: str | None, host: str | None, limit: int,
                 horizon: int) -> list[str]:
        """Ids of the newest tasks in ``state`` on ``host`` (None: any), newest first,
        looking at most ``horizon`` tasks back: filtered by Redis, one round trip."""
        with broker_errors(self.url):
            return matching_tasks(self.scripts, state, host, limit, horizon)

    def judge_crashed(self, task_id: str) -> bool:
        """End a started task whose lease expired with ThreadCrashError; True if it did."""
        with broker_errors(self.url):
            judged = judge_crashed(self.scripts, task_id, self.retention_seconds,
                                   self.lease_seconds)
        if judged and self.on_crash_judged is not None:
            self.on_crash_judged(task_id)
        return judged

    def cancel(self, task_id: str) -> str:
        with broker_errors(self.url):
            outcome = cancel_record(self.scripts, task_id, self.retention_seconds)
        if outcome == "REVOKED" and self.on_revoked is not None:
            self.on_revoked(task_id)
        return cancelled(task_id, outcome)


def found(task_id: str, snapshot: TaskSnapshot | None) -> TaskSnapshot:
    """The snapshot of a task that exists; `TaskNotFoundError` otherwise."""
    if snapshot is None:
        raise TaskNotFoundError(f"No task with id {task_id!r} (unknown, or expired)")
    return snapshot


def cancelled(task_id: str, outcome: object) -> str:
    """REVOKED (it was queued) or REQUESTED (it runs, and stops at its next check);
    the other outcomes of `task_cancel.lua` raise."""
    outcome = str(outcome)
    if outcome == "MISSING":
        raise TaskNotFoundError(f"No task with id {task_id!r} (unknown, or expired)")
    if outcome == "NOT_CANCELABLE":
        raise TaskNotCancelableError(f"Task {task_id} cannot be cancelled")
    if outcome == "COMPLETE":
        raise TaskNotCancelableError(f"Task {task_id} is already complete")
    return outcome


def withdrawn(name: str, outcome: object) -> None:
    """Raise when the withdrawal took the task back (or it was gone): it will not run."""
    if outcome in ("WITHDRAWN", "MISSING"):
        raise BrokerUnavailableError(
            f"Could not enqueue {name}: no Redis replica acknowledged it in time "
            "(the primary is failing over?); it was withdrawn and will not run")
