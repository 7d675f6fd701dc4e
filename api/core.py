"""`ServerCore`: what every producer-side operation builds on.

It holds the Redis connection and the task store, finds the host an operation
goes to, writes a task record, then enqueues the operation by name on the owning
host's queue with ``send_task``; it never imports the worker package.  The disk
and VM mixins (`api.disks`, `api.vms`) derive from it; `VirtualServer` joins them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

from celery import Celery

from api import celery_backend, events, maintenance
from api.arguments import check_int, check_task_id
from api.connection import RedisEndpoint, parse_redis_url
from api.enums import VMTaskResult
from api.errors import (
    HostUnavailableError,
    InvalidArgumentError,
    InvalidStateError,
    NotFoundError,
    OperationFailedError,
    VMTaskError,
)
from api.protocol import hresults, keys, taskcalls
from api.protocol.records import COMPLETE_STATES, PENDING, STARTED, Field, TaskSnapshot
from api.protocol.tasks import TaskSpec
from api.replication import pipelined
from api.settings import Settings, redact_url, validate_host_name
from api.store import TaskStore, broker_errors, connect, refusal_of
from api.submitting import ParentLink, host_not_live, only_host, prepare
from api.task import WAIT_FOREVER, VMTask, validate_timeout
from api.waiter import completions
from api.waiting import all_complete, task_ids_of

ALL_STATES = frozenset({PENDING, STARTED, *COMPLETE_STATES})
QUICK_TIMEOUT_MS = 60_000
# How a quick read's failure surfaces: as the exception its HRESULT names.
_QUICK_ERRORS: dict[int, type[VMTaskError]] = {
    hresults.INVALID_STATE: InvalidStateError,
    hresults.FILE_NOT_FOUND: NotFoundError,
    hresults.E_INVALIDARG: InvalidArgumentError,
}

log = logging.getLogger(__name__)

MAX_SCAN = 20_000  # how far back tasks() looks for a filter's matches


def producer_app(endpoint: RedisEndpoint | str, timeout: float = 5.0,
                 sent_events: bool = True) -> Celery:
    """A Celery app that only sends, and reads results from the task record."""
    if isinstance(endpoint, str):
        endpoint = parse_redis_url(endpoint)
    app = Celery("vmtask-producer", broker=endpoint.url, backend=celery_backend.BACKEND,
                  set_as_current=False)
    app.conf.update(
        vmtask_endpoint=endpoint,
        vmtask_redis_timeout=timeout,
        broker_use_ssl=endpoint.celery_ssl(),
        # With Sentinel: the master name, so kombu asks the sentinels for the primary.
        broker_transport_options={**endpoint.celery_transport_options(timeout),
                                  **_connect_retry(endpoint)},
        task_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # Flower shows a queued task from its task-sent event: one PUBLISH per enqueue,
        # pipelined with the message itself (VMTASK_SENT_EVENTS=0 turns it off).
        task_send_sent_event=sent_events,
        broker_connection_retry_on_startup=True,
        # Fail fast to the caller (BrokerUnavailableError) rather than retry for long;
        # with Sentinel, retry through a failover (the primary is replaced in seconds).
        task_publish_retry_policy=(
            {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.5}
            if endpoint.sentinel is None else
            {"max_retries": max(3, int(endpoint.failover_seconds / 0.5)),
             "interval_start": 0.1, "interval_step": 0.2, "interval_max": 0.5}),
    )
    return app


def _give_up_when_refused(exc: BaseException, _interval: float) -> None:
    """kombu's errback between connection attempts: a refused login is not retried."""
    if refusal_of(exc) is not None:
        raise exc


def _connect_retry(endpoint: RedisEndpoint) -> dict[str, Any]:
    """How kombu retries the producer's connection (its default: for 4 s at 2 s steps,
    about 6 s in all), as every other entry point does (docs/operations/redis.md): for
    ``failover_seconds`` (by default 15 s with Sentinel, none with one Redis).  A
    refused login or command is never retried."""
    if endpoint.failover_seconds <= 0:
        return {"max_retries": 0, "errback": _give_up_when_refused}
    return {"connect_retries_timeout": endpoint.failover_seconds, "interval_start": 0.1,
            "interval_step": 0.2, "interval_max": 0.5, "errback": _give_up_when_refused}


class ServerCore:
    def __init__(
        self,
        url: str | None = None,
        host: str | None = None,
        *,
        poll_interval: float = 1.0,
    ) -> None:
        # The producer reads only the shared knobs; VMTASK_HOST is resolved below.
        env = {k: v for k, v in os.environ.items() if k != "VMTASK_HOST"}
        if url is not None:
            env["VMTASK_REDIS_URL"] = url
        # The URL and TLS files are validated here: InvalidArgumentError, not a
        # ValueError from redis-py at the first call.
        env_settings = Settings.from_env(env)
        self.endpoint = env_settings.endpoint
        self.url = self.endpoint.url
        explicit_host = host or os.environ.get("VMTASK_HOST") or None
        self.default_host = validate_host_name(explicit_host) if explicit_host else None
        self.poll_interval = poll_interval
        self.timeout = env_settings.redis_timeout_seconds
        self.sent_events = env_settings.sent_events
        self.redis = connect(self.endpoint, self.timeout)
        self.store = TaskStore(self.redis, self.url, env_settings.retention_seconds,
                               self.endpoint, self.timeout, env_settings.lease_seconds)
        self.store.on_revoked = self._announce_revoked
        self.store.on_crash_judged = self._announce_crash
        self.scripts = self.store.scripts
        self._celery: Celery | None = None
        self._only_host: str | None = None
        # Set only on the server a composite task drives its children with.
        self.parent_link: ParentLink | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {redact_url(self.url)} host={self.default_host}>"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.store.close()
        if self._celery is not None:
            self._celery.close()
        self.redis.close()

    # -- hosts ---------------------------------------------------------------

    def _live_heartbeats(self) -> dict[str, str]:
        """Every live host's heartbeat: one round trip (a script), O(fleet) in Redis."""
        with broker_errors(self.url):
            reply = self.scripts.hosts_live(**taskcalls.hosts_arguments())
        return taskcalls.live_hosts_of(reply)

    @property
    def hosts(self) -> list[str]:
        """Names of the hosts whose worker heartbeat is live, sorted."""
        return list(self._live_heartbeats())

    def host_status(self) -> dict[str, dict[str, Any]]:
        """Each live host's last heartbeat, as the worker wrote it, with
        ``maintenance``: True while the host is in maintenance (`set_maintenance`)."""
        def build(pipe: Any) -> None:
            self.scripts.hosts_live.queue(pipe, **taskcalls.hosts_arguments())
            pipe.hgetall(keys.MAINTENANCE)

        # One round trip, as before there was maintenance.
        with broker_errors(self.url):
            reply, held = pipelined(self.redis, build, self.scripts)
        beats = taskcalls.live_hosts_of(reply)
        return {name: {**json.loads(beat), "maintenance": name in held}
                for name, beat in beats.items()}

    def set_maintenance(self, host: str, on: bool) -> None:
        """Put ``host`` in maintenance (or take it out): while it is, nothing new is
        created, started, moved or copied onto it (`HostUnavailableError` naming
        maintenance, before anything is queued); moves off it still run.  Kept in
        Redis without a TTL: it outlives workers and Redis restarts (with AOF) until
        switched off.  The host need not be live."""
        validate_host_name(host)
        if not isinstance(on, bool):
            raise InvalidArgumentError(f"on must be a bool, not {on!r}")
        with broker_errors(self.url):
            maintenance.set_flag(self.redis, host, on)

    def placeable_host(self, host: str | None, what: str) -> str:
        """`resolve_host`, refusing a host in maintenance for ``what`` (something new
        placed or started there)."""
        target = self.resolve_host(host)
        with broker_errors(self.url):
            held = self.redis.hexists(keys.MAINTENANCE, target)
        if held:
            raise maintenance.refusal(target, what)
        return target

    def resolve_host(self, host: str | None = None) -> str:
        """The host an operation goes to: explicit, configured, or the only live one."""
        wanted = host or self.default_host
        if wanted is not None:
            validate_host_name(wanted)
            # O(1): the one heartbeat; the fleet is read only to word a refusal.
            # (The submit script checks the heartbeat again, atomically.)
            with broker_errors(self.url):
                live_now = self.redis.exists(keys.host_heartbeat(wanted))
            if not live_now:
                raise host_not_live(wanted, self.hosts)
            return wanted
        # No host named: "the only live one" needs the fleet's list (O(fleet), one
        # round trip); a deployment of many hosts names them.
        return only_host(self.hosts)

    # -- tasks ---------------------------------------------------------------

    def get_task(self, task_id: str) -> VMTask:
        """Re-attach to a task from any process; `TaskNotFoundError` if unknown."""
        check_task_id(task_id)
        task = VMTask(self.store, task_id, poll_interval=self.poll_interval)
        task.snapshot()
        return task

    def submit(
        self,
        task: TaskSpec | str,
        *,
        description: str,
        cancelable: bool | None = None,
        kwargs: Mapping[str, Any] | None = None,
        host: str | None = None,
        args: Sequence[Any] = (),
        task_id: str | None = None,
    ) -> VMTask:
        """Record and enqueue one operation on its host's queue.

        Every operation goes through here with its `TaskSpec`, which checks the
        kwargs against what the worker's task takes; extensions may pass their
        own task name instead, with ``cancelable``.  The record and the message
        appear together (one script), so the id is known to `get_task` at once and
        a worker never meets a message without its record.  ``task_id`` is for
        operations made of several tasks that must know each other's ids before any
        is queued.
        """
        plan = prepare(task, description=description, cancelable=cancelable, kwargs=kwargs,
                       args=args, task_id=task_id, link=self.parent_link)
        wanted = host or self.default_host
        if wanted is not None:
            validate_host_name(wanted)
        # Without an explicit or configured host, the only live host is looked up
        # once and remembered; when it stops being live, it is looked up again.
        target = wanted or self._only_host or self.resolve_host(None)
        for attempt in (1, 2):
            message = plan.message(self.celery, target, self.url)
            # The host's liveness, the record and the message: one script, one round trip.
            if self.store.create(plan.task_id, host=target, message=message, **plan.record):
                self._only_host = None if wanted else target
                return VMTask(self.store, plan.task_id, poll_interval=self.poll_interval,
                              host=target)
            if wanted is not None:
                self.resolve_host(wanted)  # raises HostUnavailableError, naming the live hosts
            self._only_host = None
            if attempt == 1:
                target = self.resolve_host(None)
        raise HostUnavailableError(f"Host {target} stopped being live")

    def announce_child(self, task_id: str) -> None:
        """Under a composite task, list ``task_id`` in its record as a child it follows,
        before the child is queued: a parent judged crashed cancels every child its
        record lists (`api.protocol.records.cascade_cancel`), so none can run unknown to it.  One
        writer (the parent's body), so the whole list is written each time."""
        link = self.parent_link
        if link is None:
            return
        link.children.append(task_id)
        with broker_errors(self.url):
            self.redis.hset(keys.task_record(link.parent_id), Field.CHILDREN,
                            json.dumps(link.children))

    def wait_all(self, tasks: Iterable[VMTask], timeout_ms: int = -1) -> bool:
        """Wait up to ``timeout_ms`` (-1: forever; 0: look once) for every task; True
        when all are complete.  However many they are, the wait holds one pub/sub
        connection, shared with every other wait of this server."""
        return all_complete(self.as_completed(tasks, timeout_ms))

    def as_completed(self, tasks: Iterable[VMTask], timeout_ms: int = -1) -> Iterator[VMTask]:
        """Each task as it completes, in completion order (those already complete
        first, in the order they finished).  Raises `TimeoutError` when
        ``timeout_ms`` passes first (-1: forever; 0: only those complete now)."""
        by_id = task_ids_of(tasks, VMTask)
        validate_timeout(timeout_ms)
        return self._completed(by_id, timeout_ms)

    def _completed(self, by_id: dict[str, VMTask], timeout_ms: int) -> Iterator[VMTask]:
        deadline = (None if timeout_ms == WAIT_FOREVER
                    else time.monotonic() + timeout_ms / 1000)
        left = len(by_id)
        for task_id in completions(self.store, list(by_id), deadline, self.poll_interval):
            left -= 1
            yield by_id[task_id]
        if left:
            raise TimeoutError(f"{left} of {len(by_id)} task(s) not complete after "
                               f"{timeout_ms} ms")

    def task_snapshots(self, ids: Sequence[str]) -> list[TaskSnapshot | None]:
        """Every task's snapshot, in one pipelined round trip: the same order as
        ``ids``, None for an unknown (or expired) id."""
        if isinstance(ids, str) or not all(isinstance(i, str) for i in ids):
            raise InvalidArgumentError("ids must be a sequence of task id strings")
        return self.store.read_many(list(ids))

    def run_quick(self, spec: TaskSpec, *, description: str, kwargs: Mapping[str, Any],
                  host: str, timeout_ms: int = QUICK_TIMEOUT_MS) -> Any:
        """Run a quick read on its host and return its output, raising on failure.

        For reads that only the host can answer (its files, its QEMU): they go
        through the control lane like any quick operation and leave a task record.
        """
        task = self.submit(spec, description=description, kwargs=kwargs, host=host)
        if not task.wait_for_completion(timeout_ms):
            raise OperationFailedError(f"Host {host} did not answer in time: {description}")
        snap = task.snapshot()
        if snap.result is not VMTaskResult.Success:
            cls = _QUICK_ERRORS.get(snap.error, OperationFailedError)
            raise cls(f"{description}: {snap.error_description}", snap.error)
        return snap.output

    def tasks(self, state: str | None = None, host: str | None = None,
              limit: int = 50) -> list[TaskSnapshot]:
        """Recent tasks, newest first: running and completed (kept for the retention).

        ``state`` is a record state (PENDING, STARTED, SUCCESS, FAILURE, REVOKED).
        Redis applies the filters (one script, then one read of the matches), looking
        back at most 20,000 tasks.  Cost: O(fleet history scanned until ``limit``
        match, at most 20,000 records), as a listing of the fleet's tasks is; per
        request, never in any host's background.
        """
        check_int("limit", limit, 1, 10_000)
        if host is not None:
            validate_host_name(host)
        if state is not None and state not in ALL_STATES:
            raise InvalidArgumentError(f"state must be one of {sorted(ALL_STATES)}, not {state!r}")
        ids = self.store.matching(state, host, limit, MAX_SCAN)
        # None: expired between the filter and the read.
        return [snap for snap in self.store.read_many(ids) if snap is not None]

    def _announce_revoked(self, task_id: str) -> None:
        """A queued task was cancelled: Flower shows it REVOKED now, not when a worker
        reaches its message."""
        events.send(self.celery, "task-revoked", task_id, terminated=False, signum=None,
                    expired=False)

    def _announce_crash(self, task_id: str) -> None:
        events.announce_crash(self.celery, self.store.client, task_id)

    @property
    def celery(self) -> Celery:
        """The producer's Celery app: ``AsyncResult(id)`` reads the task record
        (`api.celery_backend`); ``control.revoke(id)`` cancels as `VMTask.cancel` does."""
        if self._celery is None:
            self._celery = producer_app(self.endpoint, self.timeout, self.sent_events)
        return self._celery


@dataclass(frozen=True)
class Peer:
    """One of two tasks that make one operation: each names the other's id in its
    kwargs, so the ids are chosen before either is queued."""

    spec: TaskSpec
    description: str
    kwargs: Mapping[str, Any]
    host: str
    task_id: str


def submit_peers(server: ServerCore, first: Peer, second: Peer) -> VMTask:
    """Queue ``first``, then ``second``, and return the second (the one the producer
    holds).  When the second cannot be queued, the first is cancelled: it would
    otherwise wait for a peer that never comes."""
    server.submit(first.spec, description=first.description, kwargs=first.kwargs,
                  host=first.host, task_id=first.task_id)
    try:
        return server.submit(second.spec, description=second.description, kwargs=second.kwargs,
                             host=second.host, task_id=second.task_id)
    except Exception:
        server.get_task(first.task_id).cancel()
        raise
