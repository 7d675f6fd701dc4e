"""vmtask's worker side: the Celery app and the operations it runs.

Start one per host with ``celery -A workers worker`` (or ``vmtask worker``).
``workers.app`` is built here, from the ``VMTASK_*`` environment, the first time
it is asked for: importing an engine or a task module builds nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.factory import WorkerApp

    app: WorkerApp

__all__ = ["app"]

_app: WorkerApp | None = None


def __getattr__(name: str) -> Any:
    global _app
    if name != "app":
        raise AttributeError(f"module 'workers' has no attribute {name!r}")
    if _app is None:
        from api.settings import Settings
        from workers.factory import create_app

        _app = create_app(Settings.from_env())
    return _app
