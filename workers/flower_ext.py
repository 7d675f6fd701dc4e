"""Flower shows a task's percent and description: in its task API and as tasks-page columns.

Workers send both in every ``task-progress`` event (`api.events.progress_fields`),
and Flower keeps them on its ``celery.events.state.Task``; but Flower 2.2 shows
only ``Task._fields`` (``as_dict``: ``/api/task/info``, ``/api/tasks``, the tasks
page's rows) and offers columns only from ``flower.views.tasks.TASK_COLUMNS``
(flower#453 asked for custom columns).  `install` extends both, and makes the
tasks page show the two columns by default.

It runs wherever the workers' app is built (`workers.factory.create_app`), so
``celery -A workers flower`` gets it with or without ``--conf``: the compose
service, docs/operations/flower.md's recipes, and anyone's own Flower configuration.  The
default columns are set before Flower reads its options, so ``--tasks_columns``,
``FLOWER_TASKS_COLUMNS`` and a configuration file's ``tasks_columns`` still choose.

The two names patched are private to Celery and Flower.
`tests/integration/test_flower.py` asserts they exist and that a real Flower
process shows the fields and columns, so an upgrade that stops honouring them
fails there.  Without Flower installed (it is the ``flower`` extra) only the
Celery part applies, and it costs nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import states
from celery.events.state import Task as EventTask

log = logging.getLogger(__name__)

PROGRESS_FIELDS = ("percent", "description")
COLUMN_LABELS = {"percent": "Progress", "description": "Description"}


def _percent(task: Any) -> Any:
    """The last event's percent; 100 once the task succeeded, as in the record (the
    ``task-succeeded`` event is Celery's own, and carries no percent)."""
    if task.state == states.SUCCESS:
        return 100
    return task.__dict__.get("percent")


def extend_task_fields(task_class: Any = EventTask) -> None:
    """``as_dict`` (Flower's task API) includes the progress fields; None until an
    event carries them, as for Celery's own fields."""
    if not isinstance(getattr(task_class, "percent", None), property):
        # A property outranks the instance's __dict__, where events put the value.
        task_class.percent = property(_percent)
    if not hasattr(task_class, "description"):
        task_class.description = None
    missing = tuple(name for name in PROGRESS_FIELDS if name not in task_class._fields)
    task_class._fields = tuple(task_class._fields) + missing


def add_task_columns() -> bool:
    """Offer the progress columns on Flower's tasks page and show them by default;
    False when Flower is not installed."""
    try:
        from flower.options import options
        from flower.views import tasks as flower_tasks
    except ImportError:
        return False
    for name, label in COLUMN_LABELS.items():
        flower_tasks.TASK_COLUMNS.setdefault(name, label)
    options.tasks_columns = with_progress_columns(options.tasks_columns)
    return True


def with_progress_columns(columns: str) -> str:
    """Flower's default columns with ours after ``state`` (at the end without one).

    This runs before Flower applies FLOWER_*, --conf and the command line, so the
    value it changes is Flower's default, whatever a release makes it."""
    names = [name.strip() for name in columns.split(",") if name.strip()]
    missing = [name for name in PROGRESS_FIELDS if name not in names]
    at = names.index("state") + 1 if "state" in names else len(names)
    return ",".join(names[:at] + missing + names[at:])


def install() -> None:
    extend_task_fields()
    if not add_task_columns():
        log.debug("Flower is not installed: its tasks page is not extended")
