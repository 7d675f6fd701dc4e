"""What an engine sees of the task it runs: progress, cancellation and its log.

Engines (disk, VM) take an `OperationContext` instead of a Celery task, so they can
be driven and tested without a broker.  `NullContext` is the do-nothing one;
`scaled` gives one step of several its slice of the progress, and `ProgressSpan`
maps an engine's own readings onto a slice.
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

    def log(self, line: str) -> None:
        """Append a line to the task's log (phases, commands, events, retries,
        warnings, the reason for a choice), time-stamped by the runtime.  Never a
        secret: no password, no key's contents (paths to them are fine)."""


def raise_if_cancelled(context: OperationContext) -> None:
    if context.cancel_requested():
        raise Cancelled()


class ProgressSpan:
    """Maps a step's own 0..100 onto its slice ``low..high`` of the task's progress.

    Never reports a decrease, and drops steps finer than ``min_step`` (the runtime's
    rate limit would drop them anyway); reaching ``high`` is always reported.
    """

    def __init__(self, context: OperationContext, low: float = 0.0, high: float = 100.0,
                 *, min_step: float = 0.0) -> None:
        self._context = context
        self._low = low
        self._high = high
        self._min_step = min_step
        self._last = -1.0

    def step(self, percent: float) -> None:
        """Report ``percent`` (0..100) of this span."""
        percent = max(0.0, min(100.0, percent))
        # Scaled by (high - low) / 100 so that the full span 0..100 passes values unchanged.
        value = self._low + percent * ((self._high - self._low) / 100.0)
        if (value >= self._last + self._min_step and value > self._last) \
                or (percent == 100.0 and self._last < value):
            self._last = value
            self._context.report_progress(value)

    def span(self, low: float, high: float, fraction: float) -> None:
        """Report ``fraction`` (0..1) of the sub-slice ``low..high`` of this span."""
        self.step(low + (high - low) * max(0.0, min(1.0, fraction)))


class _Scaled:
    """A context whose progress fills the slice ``low..high`` of its parent's."""

    def __init__(self, context: OperationContext, low: float, high: float) -> None:
        self.task_id = context.task_id
        self._context, self._low, self._high = context, low, high

    def report_progress(self, percent: float) -> None:
        self._context.report_progress(self._low + (self._high - self._low) * percent / 100)

    def cancel_requested(self) -> bool:
        return self._context.cancel_requested()

    def log(self, line: str) -> None:
        self._context.log(line)


def scaled(context: OperationContext, low: float, high: float) -> OperationContext:
    """``context`` for one step of several: the step reports its own 0..100, which
    fills ``low..high`` of the task's progress; cancel and log pass through.  Unlike
    `ProgressSpan` it is a whole context, for handing a step's engine call."""
    return _Scaled(context, low, high)


class NullContext:
    """A context that records progress in memory and can be cancelled by hand."""

    def __init__(self, task_id: str = "local") -> None:
        self.task_id = task_id
        self.progress: list[float] = []
        self.lines: list[str] = []
        self.cancelled = False

    def report_progress(self, percent: float) -> None:
        self.progress.append(percent)

    def cancel_requested(self) -> bool:
        return self.cancelled

    def log(self, line: str) -> None:
        self.lines.append(line)
