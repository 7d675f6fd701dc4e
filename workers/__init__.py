"""vmtask's worker side: the Celery app and the operations it runs.

Start one per host with ``celery -A workers worker`` (or ``vmtask worker``).
``workers.app`` is built here, from the ``VMTASK_*`` environment, the first time
it is asked for: importing an engine or a task module builds nothing.
"""

from __future__ import annotations

import logging
import os
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
        from celery.signals import celeryd_after_setup

        from api.settings import Settings
        from workers.factory import create_app

        settings = Settings.from_env()
        _app = create_app(settings)
        if settings.role == "main":  # the control lane has the same environment
            celeryd_after_setup.connect(_warn_about_unknown_variables, weak=False)
    return _app


def _warn_about_unknown_variables(**_: object) -> None:
    """At worker start (once its logging is set up): a misspelt ``VMTASK_*`` variable
    would otherwise be ignored in silence.  Names only: a value may be a secret."""
    from api.settings import unknown_variables  # not at import: it loads redis-py

    for name, closest in unknown_variables(os.environ):
        hint = f"; did you mean {closest}?" if closest else ""
        logging.getLogger(__name__).warning(
            "%s is not a vmtask setting and is ignored%s", name, hint)
