"""The worker's Celery app, configured from ``VMTASK_*`` variables.

``celery -A workers worker`` finds `app` through ``workers/__init__.py`` and
consumes ``host.<VMTASK_HOST>`` only.
"""

from __future__ import annotations

from celery import Celery
from kombu.entity import Queue

from api.protocol import keys
from api.settings import Settings

settings = Settings.from_env()
HOST_QUEUE = keys.host_queue(settings.host)

OPERATION_MODULES = ["workers.tasks.diagnostics", "workers.tasks.disks", "workers.tasks.vms"]

app = Celery("vmtask", broker=settings.redis_url, backend=settings.redis_url)
app.conf.update(
    include=OPERATION_MODULES,
    # JSON only, both ways: a pickled message is refused (ContentDisallowed) unread.
    task_serializer="json",
    result_serializer="json",
    event_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    task_queues=[Queue(HOST_QUEUE, routing_key=HOST_QUEUE)],  # type: ignore[no-untyped-call]
    task_default_queue=HOST_QUEUE,
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
)

# Signal handlers: host heartbeat, lease reaper, start-up cleanup.
from workers import host as _host  # noqa: E402,F401
