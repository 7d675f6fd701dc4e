"""Builds the worker's Celery app from a `Settings` passed in.

`create_app` is the one place that configures Celery; nothing here reads the
environment.  ``celery -A workers worker`` gets its app from ``workers/__init__``,
which builds it from ``VMTASK_*`` variables on first use.  The app consumes
``host.<VMTASK_HOST>`` only.
"""

from __future__ import annotations

from celery import Celery
from kombu.entity import Queue

from api.protocol import keys
from api.settings import Settings
from workers import host
from workers.tasks import diagnostics, disks, vms

OPERATION_MODULES = [diagnostics.__name__, disks.__name__, vms.__name__]

# The host's main process runs these, explicitly listed rather than collected as a
# side effect of imports.
HOST_HOOKS = host.HostHooks(
    startup=(disks.remove_crashed_temporaries, vms.reconcile_vms),
    tick=(vms.watch_vms,),
    status=(vms.vm_counts,),
)


class WorkerApp(Celery):  # type: ignore[misc]
    """A Celery app that carries the vmtask settings it was built with."""

    settings: Settings


def create_app(settings: Settings) -> WorkerApp:
    queue = keys.host_queue(settings.host)
    app = WorkerApp("vmtask", broker=settings.redis_url, backend=settings.redis_url)
    app.settings = settings
    app.conf.update(
        include=OPERATION_MODULES,
        # JSON only, both ways: a pickled message is refused (ContentDisallowed) unread.
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_queues=[Queue(queue, routing_key=queue)],  # type: ignore[no-untyped-call]
        task_default_queue=queue,
        # Task events feed Flower: it sees workers, task names, arguments and states.
        worker_send_task_events=True,
        task_send_sent_event=True,
        # Delivery policy: at most once.  Merges and saves are not idempotent, so a
        # task must never run twice, even if its worker dies mid-way:
        #  - acks_late=False: the message is acknowledged as its execution starts, so
        #    a worker dying mid-task does not give the message back to the queue;
        #    the task's lease expiring turns it into ThreadCrashError instead.
        #  - reject_on_worker_lost=False: likewise for a pool child killed mid-task.
        #  - visibility_timeout only governs messages a worker reserved but never
        #    started (prefetch); they are redelivered after it.  A redelivered copy
        #    of a task that did start meets the record's start gate (PENDING only)
        #    and is dropped, which is what makes a short timeout safe.
        #  - prefetch_multiplier=1 keeps few messages reserved behind a long task.
        task_acks_late=False,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": 600},
        broker_connection_retry_on_startup=True,
        # Our own record carries the state; Celery's "STARTED" write would be redundant.
        task_track_started=False,
        result_expires=int(settings.retention_seconds),
        worker_hijack_root_logger=False,
        # An operation's limits unless it sets its own.  The hard limit kills a body
        # that ignores the soft one; its lease then lapses and it ends ThreadCrashError.
        task_soft_time_limit=settings.time_limit_seconds,
        task_time_limit=settings.time_limit_seconds + 30,
    )
    host.install(app, settings, HOST_HOOKS)
    return app
