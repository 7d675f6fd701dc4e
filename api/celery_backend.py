"""Celery's result API over the task record: ``AsyncResult(id)`` reads the truth.

vmtask keeps one source of truth per task, its record in Redis.  This result
backend reads that record and writes nothing, so Celery's own surfaces
(``AsyncResult(id).state`` / ``.info`` / ``.result``, ``celery -A workers result``)
agree with `VMTask` and cannot drift from it:

    record PENDING                 -> PENDING
    record STARTED, percent == 0   -> STARTED   info {"percent": 0, "description": ...}
    record STARTED, percent > 0    -> PROGRESS  info {"percent": n, "description": ...}
    record SUCCESS                 -> SUCCESS   result: the operation's output
    record FAILURE (crash too)     -> FAILURE   result: errors.TaskFailedError
    record REVOKED (Cancelled)     -> REVOKED   result: errors.TaskFailedError

``PROGRESS`` with ``info["percent"]`` is the idiom celery-progress and dashboards
read.  The producer's app (``server.celery``) and the workers' app both use it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from celery import states
from celery.backends.base import BaseBackend

from api import events
from api.errors import TaskFailedError, TaskNotFoundError
from api.protocol import records
from api.protocol.records import cancel_record
from api.store import TaskStore, connect

BACKEND = f"{__name__}:RecordBackend"
PROGRESS = "PROGRESS"
DEFAULT_TIMEOUT = 5.0
DEFAULT_RETENTION = 86400.0


class RecordBackend(BaseBackend):  # type: ignore[misc]
    def __init__(self, app: Any, url: str | None = None, **kwargs: Any) -> None:
        super().__init__(app, url=url, **kwargs)
        # The app's validated endpoint carries its TLS options; a bare URL has none.
        endpoint = app.conf.get("vmtask_endpoint") or url or app.conf.broker_url
        timeout = float(app.conf.get("vmtask_redis_timeout") or DEFAULT_TIMEOUT)
        retention = float(app.conf.get("vmtask_retention_seconds") or DEFAULT_RETENTION)
        broker = endpoint if isinstance(endpoint, str) else endpoint.url
        self._store = TaskStore(connect(endpoint, timeout), broker, retention)
        self._store.on_crash_judged = lambda task_id: events.announce_crash(
            app, self._store.client, task_id)

    def as_uri(self, include_password: bool = False) -> str:
        return "vmtask-record://"

    def _get_task_meta_for(self, task_id: str) -> dict[str, Any]:
        try:
            snap = self._store.read(task_id)
        except TaskNotFoundError:
            return {"task_id": task_id, "status": states.PENDING, "result": None}
        status: str = snap.state
        result: Any = None
        if snap.state == records.STARTED:
            status = PROGRESS if snap.percent_completed > 0 else states.STARTED
            result = events.progress_meta(snap.percent_completed, snap.description)
        elif snap.state == records.SUCCESS:
            result = snap.output
        elif snap.is_complete and snap.result is not None:
            result = TaskFailedError(snap.result.name, snap.error, snap.error_description)
        done = (datetime.fromtimestamp(snap.finished, UTC).isoformat()
                if snap.finished else None)
        return {"task_id": task_id, "status": status, "result": result, "traceback": None,
                "children": [], "date_done": done}

    def _store_result(self, task_id: str, result: Any, state: str, traceback: Any = None,
                      request: Any = None, **kwargs: Any) -> Any:
        # The record is written by vmtask's own scripts; a second copy would drift.
        return result

    def store_result(self, task_id: str, result: Any, state: str, traceback: Any = None,
                     request: Any = None, **kwargs: Any) -> Any:
        return result

    def mark_as_revoked(self, task_id: str, reason: str = "", request: Any = None,
                        store_result: bool = True, state: str = states.REVOKED) -> None:
        """Celery's revoke of a task it found queued (Flower's button, ``celery control
        revoke``, an expired message): the record ends Cancelled, as `VMTask.cancel`
        makes it, even for an operation that is not cancelable once running."""
        outcome = cancel_record(self._store.scripts, task_id, self._store.retention_seconds,
                                revoke_queued=True)
        if outcome == "REVOKED":
            events.send(self.app, "task-revoked", task_id, terminated=False, signum=None,
                        expired=reason == "expired")

    def _forget(self, task_id: str) -> None:
        """Records expire by retention; forgetting one is not Celery's to do."""
