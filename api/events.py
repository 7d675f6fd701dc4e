"""Celery task events for transitions that vmtask makes outside Celery's own flow.

Celery sends task-received/started/succeeded itself.  vmtask adds the events
that make Flower (and any ``celery events`` consumer) converge on the record:
``task-progress`` (state PROGRESS, with percent and description), ``task-failed``
with the VMTaskResult and HRESULT and no traceback for an expected failure,
``task-revoked`` for Cancelled, and ``task-failed`` when a crash is judged,
whoever judges it (a producer, a worker's reaper).  Events are monitoring:
sending one never fails an operation.
"""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

from celery import Celery

from api.enums import VMTaskResult
from api.errors import TaskFailedError
from api.protocol import hresults, keys
from api.protocol.taskcalls import CRASH_DESCRIPTION

log = logging.getLogger(__name__)

PROGRESS_EVENT = "task-progress"


def progress_meta(percent: int, description: str) -> dict[str, Any]:
    """The PROGRESS meta, as Celery's idiom has it: ``info`` for AsyncResult."""
    return {"percent": percent, "description": description}


def progress_fields(percent: int, description: str) -> dict[str, Any]:
    """Flower keeps ``result`` (the Celery idiom for PROGRESS meta) in its task API."""
    meta = progress_meta(percent, description)
    return {**meta, "result": json.dumps(meta)}


def failure_fields(result: str, hresult: int, description: str,
                   traceback: str | None = None) -> dict[str, Any]:
    return {"exception": repr(TaskFailedError(result, hresult, description)),
            "traceback": traceback}


def crash_fields() -> dict[str, Any]:
    return failure_fields(VMTaskResult.ThreadCrashError.name, hresults.SERVER_FAULT,
                          CRASH_DESCRIPTION)


def announce_crash(app: Celery, client: Any, task_id: str, judge: str | None = None) -> None:
    """Tell Flower a task was judged crashed, as an event of the worker that ran it.

    Flower attributes a task event to the node named in it; the judge (a producer,
    another worker's reaper) is not where the task ran.  The start gate recorded
    that worker's Celery node name; a record without one (started by an older
    worker) is announced by ``judge``, as before.
    """
    node: str | None = None
    description: str | None = None
    try:
        node, description = client.hmget(keys.task_record(task_id), "node", "description")
    except Exception as exc:  # noqa: BLE001 - monitoring must never fail an operation
        log.warning("Could not read which worker ran %s: %s", task_id, exc)
    extra = {"description": description} if description else {}
    send(app, "task-failed", task_id, hostname=node or judge, **crash_fields(), **extra)


def send(app: Celery, event_type: str, task_id: str, hostname: str | None = None,
         **fields: Any) -> None:
    """Send one task event from outside a running task (best effort)."""
    try:
        with app.events.default_dispatcher(
                hostname=hostname or f"vmtask@{socket.gethostname()}") as dispatcher:
            dispatcher.send(event_type, uuid=task_id, **fields)
    except Exception as exc:  # noqa: BLE001 - monitoring must never fail an operation
        log.warning("Could not send %s for %s: %s", event_type, task_id, exc)
