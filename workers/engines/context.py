"""What an engine sees of the task it runs: progress and cancellation.

Engines (disk, VM) take an `OperationContext` instead of a Celery task, so they can
be driven and tested without a broker.  `NullContext` is the do-nothing one.
"""

from __future__ import annotations

from typing import Protocol

from workers.failures import Cancelled


class OperationContext(Protocol):
    task_id: str

    def report_progress(self, percent: float) -> None:
        """Monotonic 0..100; the runtime drops decreases and rate-limits writes."""

    def cancel_requested(self) -> bool:
        """True once a cancel request exists; cheap enough to call in a poll loop."""


def raise_if_cancelled(context: OperationContext) -> None:
    if context.cancel_requested():
        raise Cancelled()


class NullContext:
    """A context that records progress in memory and can be cancelled by hand."""

    def __init__(self, task_id: str = "local") -> None:
        self.task_id = task_id
        self.progress: list[float] = []
        self.cancelled = False

    def report_progress(self, percent: float) -> None:
        self.progress.append(percent)

    def cancel_requested(self) -> bool:
        return self.cancelled
