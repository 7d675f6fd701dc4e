"""vmtask's worker side: the Celery app and the operations it runs.

Start one per host with ``celery -A workers worker`` (or ``vmtask worker``).
"""

from workers.app import app, settings

__all__ = ["app", "settings"]
