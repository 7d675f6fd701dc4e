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
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Self

from celery import Celery
from kombu.exceptions import OperationalError

from api.arguments import check_int, check_task_id
from api.errors import (
    BrokerUnavailableError,
    HostUnavailableError,
    InvalidArgumentError,
)
from api.protocol import keys
from api.protocol.records import COMPLETE_STATES, PENDING, STARTED, TaskSnapshot
from api.protocol.tasks import TaskSpec
from api.settings import DEFAULT_REDIS_URL, Settings, redact_url, validate_host_name
from api.store import TaskStore, broker_errors, connect
from api.task import VMTask

ALL_STATES = frozenset({PENDING, STARTED, *COMPLETE_STATES})

log = logging.getLogger(__name__)

MAX_SCAN = 20_000  # how far back tasks() looks when filters are selective


def producer_app(url: str, timeout: float = 5.0) -> Celery:
    """A Celery app that only sends: JSON only, no result backend reads."""
    app = Celery("vmtask-producer", broker=url, set_as_current=False)
    app.conf.update(
        broker_transport_options={"socket_timeout": timeout, "socket_connect_timeout": timeout},
        task_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # No task-sent event: it would cost a PUBLISH per enqueue; Flower learns of a
        # task from the worker's task-received event.
        task_send_sent_event=False,
        broker_connection_retry_on_startup=True,
        # Fail fast to the caller (BrokerUnavailableError) rather than retry for long.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.5},
    )
    return app


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
        env_settings = Settings.from_env(env)
        self.url = url or os.environ.get("VMTASK_REDIS_URL") or DEFAULT_REDIS_URL
        explicit_host = host or os.environ.get("VMTASK_HOST") or None
        self.default_host = validate_host_name(explicit_host) if explicit_host else None
        self.poll_interval = poll_interval
        self.timeout = env_settings.redis_timeout_seconds
        self.redis = connect(self.url, self.timeout)
        self.store = TaskStore(self.redis, self.url, env_settings.retention_seconds)
        self._celery: Celery | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {redact_url(self.url)} host={self.default_host}>"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.store.drop_subscription()
        if self._celery is not None:
            self._celery.close()
        self.redis.close()

    # -- hosts ---------------------------------------------------------------

    @property
    def hosts(self) -> list[str]:
        """Names of the hosts whose worker heartbeat is live, sorted."""
        with broker_errors(self.url):
            known = sorted(self.redis.smembers(keys.KNOWN_HOSTS))
            if not known:
                return []
            pipe = self.redis.pipeline(transaction=False)
            for name in known:
                pipe.exists(keys.host_heartbeat(name))
            alive = pipe.execute()
        return [name for name, live in zip(known, alive, strict=True) if live]

    def host_status(self) -> dict[str, dict[str, Any]]:
        """Each live host's last heartbeat, as the worker wrote it."""
        with broker_errors(self.url):
            known = sorted(self.redis.smembers(keys.KNOWN_HOSTS))
            values = self.redis.mget([keys.host_heartbeat(n) for n in known]) if known else []
        return {n: json.loads(v) for n, v in zip(known, values, strict=True) if v}

    def resolve_host(self, host: str | None = None) -> str:
        """The host an operation goes to: explicit, configured, or the only live one."""
        wanted = host or self.default_host
        live = self.hosts
        if wanted is not None:
            validate_host_name(wanted)
            if wanted not in live:
                raise HostUnavailableError(
                    f"No live worker serves host {wanted!r} (live: {', '.join(live) or 'none'})"
                )
            return wanted
        if len(live) == 1:
            return live[0]
        if not live:
            raise HostUnavailableError("No worker host is live; start one with 'vmtask worker'")
        raise InvalidArgumentError(
            f"Several hosts are live ({', '.join(live)}): pass host= or set VMTASK_HOST"
        )

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
    ) -> VMTask:
        """Record and enqueue one operation on its host's queue.

        Every operation goes through here with its `TaskSpec`, which checks the
        kwargs against what the worker's task takes; extensions may pass their
        own task name instead, with ``cancelable``.  The record exists before the
        message, so the id is known to `get_task` at once and a worker never runs
        a task without a record.
        """
        arguments = dict(kwargs or {})
        quick = False
        if isinstance(task, TaskSpec):
            task.check_kwargs(arguments)
            task_name, cancelable, quick = task.name, task.cancelable, task.quick
        else:
            task_name = task
        if cancelable is None:
            raise TypeError(f"cancelable is required for the task {task_name!r}")
        target = self.resolve_host(host)
        task_id = str(uuid.uuid4())
        self.store.create(
            task_id,
            name=task_name,
            description=description,
            host=target,
            cancelable=cancelable,
            arguments={"args": list(args), **arguments},
        )
        queue = keys.control_queue(target) if quick else keys.host_queue(target)
        try:
            self.celery.send_task(
                task_name,
                args=list(args),
                kwargs=arguments,
                task_id=task_id,
                queue=queue,
                routing_key=queue,
            )
        except OperationalError as exc:
            self.store.discard(task_id)
            raise BrokerUnavailableError(f"Could not enqueue {task_name}: {exc}") from None
        return VMTask(self.store, task_id, poll_interval=self.poll_interval)

    def tasks(self, state: str | None = None, host: str | None = None,
              limit: int = 50) -> list[TaskSnapshot]:
        """Recent tasks, newest first: running and completed (kept for the retention).

        ``state`` is a record state (PENDING, STARTED, SUCCESS, FAILURE, REVOKED).
        """
        check_int("limit", limit, 1, 10_000)
        if host is not None:
            validate_host_name(host)
        if state is not None and state not in ALL_STATES:
            raise InvalidArgumentError(f"state must be one of {sorted(ALL_STATES)}, not {state!r}")
        found: list[TaskSnapshot] = []
        # Filters may drop most of a page; read further back in pages until satisfied.
        scanned = 0
        page = max(limit, 100)
        while len(found) < limit:
            ids = self.store.recent(scanned + page)[scanned:]
            if not ids:
                break
            scanned += len(ids)
            for snap in self.store.read_many(ids):
                if (state is None or snap.state == state) and (host is None or snap.host == host):
                    found.append(snap)
            if scanned >= MAX_SCAN:
                break
        return found[:limit]

    @property
    def celery(self) -> Celery:
        if self._celery is None:
            self._celery = producer_app(self.url, self.timeout)
        return self._celery
