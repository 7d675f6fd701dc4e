"""Celery's monitoring surfaces agree with the record: revocation, node names, states.

- **Revocation both ways.**  ``revoke(id)`` (Flower's button, ``celery control
  revoke``) of a queued task ends it Cancelled through the result backend
  (`api.celery_backend.RecordBackend.mark_as_revoked`).  ``revoke(id,
  terminate=True)`` of a running task is a *cancel*: Celery would kill the pool
  process mid-write, so vmtask turns it into the record's cancel request, and the
  operation stops its subprocess, removes its partial output and ends Cancelled.
  A running operation that cannot be cancelled (a merge) ignores it and finishes.
- **Node names carry the host.**  A worker started without ``-n`` is named
  ``<VMTASK_HOST>@<machine>`` instead of ``celery@<machine>``.
- **PROGRESS comes between STARTED and the end.**  Celery's event state ranks an
  unknown state such as PROGRESS above REVOKED, so a ``task-revoked`` after
  progress events would leave Flower showing PROGRESS for good.  Ranked after
  STARTED (a late task-started event cannot undo it) and before REVOKED and every
  final state, each event lands where it belongs.  This runs wherever the app is
  built, Flower included (``celery -A workers flower``).
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from celery import Celery, states
from celery.app import trace
from celery.signals import celeryd_init
from celery.utils.nodenames import default_nodename
from celery.worker import control
from kombu.utils.functional import maybe_list

from api.protocol.records import cancel_record
from api.settings import Settings
from workers.runtime import worker_redis

log = logging.getLogger(__name__)

PROGRESS = "PROGRESS"


def rank_progress_as_started() -> None:
    """PROGRESS comes after STARTED and before every final state (and REVOKED)."""
    started = states.PRECEDENCE_LOOKUP[states.STARTED]
    revoked = states.PRECEDENCE_LOOKUP[states.REVOKED]
    states.PRECEDENCE_LOOKUP[PROGRESS] = (started + revoked) / 2


def install(app: Celery, settings: Settings) -> None:
    rank_progress_as_started()
    celery_revoke = control.Panel.data["revoke"]
    meta = control.Panel.meta["revoke"]

    def revoke(state: Any, task_id: Any, terminate: bool = False, signal: Any = None,
               **kwargs: Any) -> Any:
        if terminate:
            scripts = worker_redis(settings).scripts
            for one in maybe_list(task_id) or []:  # type: ignore[no-untyped-call]
                outcome = cancel_record(scripts, one, int(settings.retention_seconds),
                                        revoke_queued=True)
                log.info("Revoke with terminate of %s is a cancel: %s", one, outcome)
        return celery_revoke(state, task_id, terminate=False, signal=signal, **kwargs)

    revoke.__doc__ = celery_revoke.__doc__
    control.Panel.register(revoke, name="revoke", type=meta.type, visible=meta.visible,
                           default_timeout=meta.default_timeout, help=meta.help,
                           signature=meta.signature, args=meta.args, variadic=meta.variadic)

    def name_after_host(sender: Any = None, instance: Any = None, **_: object) -> None:
        if instance is None or getattr(instance, "app", app) is not app:
            return
        if instance.hostname == default_nodename(None):
            instance.hostname = f"{settings.host}@{socket.gethostname()}"
            trace.setup_worker_optimizations(app, instance.hostname)

    celeryd_init.connect(name_after_host, weak=False)
