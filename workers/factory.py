"""Builds the worker's Celery app from a `Settings` passed in.

`create_app` is the one place that configures Celery; nothing here reads the
environment.  ``celery -A workers worker`` gets its app from ``workers/__init__``,
which builds it from ``VMTASK_*`` variables on first use.  The app consumes
``host.<VMTASK_HOST>`` only.
"""

from __future__ import annotations

from celery import Celery
from kombu.entity import Queue

from api import celery_backend
from api.protocol import keys
from api.settings import Settings
from workers import control as control_lane
from workers import flower_ext, host, monitoring, transport
from workers.tasks import (
    backup_restore,
    backup_verify,
    backups,
    clone_remote,
    clones,
    diagnostics,
    disk_inventory,
    disks,
    evacuation,
    guest_os,
    live_migration,
    live_recovery,
    live_resize,
    migration,
    migration_journal,
    snapshots,
    snapshots_live,
    transfer,
    vm_console,
    vms,
)

OPERATION_MODULES = [diagnostics.__name__, disks.__name__, disk_inventory.__name__,
                     vms.__name__, guest_os.__name__, vm_console.__name__, transfer.__name__,
                     migration.__name__, live_migration.__name__,
                     snapshots.__name__, clones.__name__, live_resize.__name__,
                     clone_remote.__name__, evacuation.__name__, backups.__name__,
                     backup_restore.__name__, backup_verify.__name__]

# The host's main process runs these, explicitly listed rather than collected as a
# side effect of imports.
HOST_HOOKS = host.HostHooks(
    # A live migration's half-received VM may have a QEMU running: it goes before
    # the migrations' journals are swept.
    startup=(disks.remove_crashed_temporaries, live_recovery.recover_migrations,
             migration_journal.remove_unfinished_migrations,
             vms.index_host_vms, snapshots_live.recover_pending, vms.reconcile_vms,
             snapshots.recover, backup_verify.stop_unfinished_verifications,
             clones.remove_unfinished_clones, backups.recover_repositories),
    tick=(vms.watch_vms, vm_console.rotate_console_logs),
    status=(vms.vm_counts, evacuation.memory_status),
)


class WorkerApp(Celery):  # type: ignore[misc]
    """A Celery app that carries the vmtask settings it was built with."""

    settings: Settings


def create_app(settings: Settings) -> WorkerApp:
    """The worker's app.  Its delivery policy, in one place:

    - **At most once.**  A message is acknowledged when its execution starts
      (``task_acks_late=False``), so a worker dying mid-task does not hand it back;
      the task's lease lapses and it ends ThreadCrashError instead.  Every copy of a
      message (a redelivery, a duplicate, a forgery) meets the record's start gate,
      which lets exactly one delivery run the body and drops the rest untouched.
    - **Never stranded.**  A worker takes a message only when a slot is free
      (``worker_disable_prefetch``), so nothing waits reserved behind a long task.
      A message taken but never started (its worker died, or Redis restarted) goes
      back to the queue after ``VMTASK_VISIBILITY_TIMEOUT_SECONDS``; kombu checks
      every 10 s, so it runs within that plus 10 s of a worker being free.
    - **Control never waits behind a copy.**  Quick operations go to
      ``host.<name>.control``, served by a lane of their own (`workers.control`),
      and also by this worker when it has a free slot.
    - **No message stops a worker** (`workers.transport`).
    - **Every Redis call has a deadline** (``VMTASK_REDIS_TIMEOUT_SECONDS``).
    """
    transport.install()
    monitoring.rank_progress_as_started()
    # Flower runs this app too (celery -A workers flower): its API and tasks page
    # then show percent and description.
    flower_ext.install()
    long_queue = keys.host_queue(settings.host)
    control = keys.control_queue(settings.host)
    queues = [control] if settings.role == "control" else [long_queue, control]
    endpoint = settings.endpoint
    app = WorkerApp("vmtask", broker=endpoint.url, backend=celery_backend.BACKEND)
    app.settings = settings
    app.conf.update(
        include=OPERATION_MODULES,
        vmtask_endpoint=endpoint,
        vmtask_redis_timeout=settings.redis_timeout_seconds,
        vmtask_retention_seconds=settings.retention_seconds,
        # JSON only, both ways: a pickled message is refused (ContentDisallowed) unread.
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_queues=[Queue(q, routing_key=q) for q in queues],  # type: ignore[no-untyped-call]
        task_default_queue=long_queue,
        # Task events feed Flower: it sees workers, task names, arguments and states.
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_acks_late=False,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,
        worker_concurrency=(settings.control_concurrency if settings.role == "control"
                            else settings.concurrency),
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_seconds,
            # kombu 5.7 scans for such messages only every 10th restore tick (100 s);
            # every tick (10 s) makes "within the visibility timeout plus 10 s" true.
            # Its lock on the scan expires after 5 min by default: a scanner that lost
            # its Redis mid-scan (a failover) would stall every restore that long.
            "unacked_restore_throttle": 1,
            "unacked_mutex_expire": 60,
            # With Sentinel, the master name: kombu asks the sentinels for the primary
            # on every (re)connect, and Celery's consumer reconnects after a failover.
            **endpoint.celery_transport_options(settings.redis_timeout_seconds),
        },
        broker_connection_retry_on_startup=True,
        # TLS from the one validated endpoint (api.connection): the URL carries no
        # ssl_* parameters, so Celery, kombu and Flower all read these instead.
        broker_use_ssl=endpoint.celery_ssl(),
        redis_backend_use_ssl=endpoint.celery_ssl(),
        redis_socket_timeout=settings.redis_timeout_seconds,
        redis_socket_connect_timeout=settings.redis_timeout_seconds,
        # Our own record carries the state; Celery's "STARTED" write would be redundant.
        task_track_started=False,
        result_expires=int(settings.retention_seconds),
        worker_hijack_root_logger=False,
        # An operation's limits unless it sets its own.  The hard limit kills a body
        # that ignores the soft one; its lease then lapses and it ends ThreadCrashError.
        task_soft_time_limit=settings.time_limit_seconds,
        task_time_limit=settings.time_limit_seconds + 30,
    )
    monitoring.install(app, settings)
    if settings.role == "main":
        host.install(app, settings, HOST_HOOKS)
        control_lane.install(app, settings)
    return app
