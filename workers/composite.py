"""Composite tasks: one task that starts, follows and cancels others, its children.

A composite operation's body (a host evacuation is the first) drives its children
through a `Composite`.  The children are ordinary tasks, submitted through a
`VirtualServer` linked to the parent (`api.submitting.ParentLink`): each carries the
parent's id in its record and Celery's ``parent_id``/``root_id`` in its message,
and is listed in the parent's record before it is queued.

The rules, the same for every composite operation:

- **Percent**: the mean of the children's percent over every child planned (one
  not started yet counts 0, one ended 100); `TaskRun.report_progress` keeps the
  maximum, so it never goes backwards.  ``AsyncResult(parent)`` reads it as PROGRESS.
- **Cancel** of the parent (or its lease lost): no child is started after it; every
  child still running is asked to cancel, and one past its point of no return (a
  live migration past its switch-over) refuses and finishes; the parent waits for
  them all, then ends Cancelled.
- **Result**: Success only if every child succeeded; otherwise that of the first
  child to fail (by when it ended): its VMTaskResult and HRESULT, the description
  naming what it worked on.  A child refused before it was queued counts as failed
  then, with the refusal's HRESULT.
- **A killed driving worker**: the parent is not resumed.  Its lease lapses and
  whoever judges it crashed (a host's reaper within a beat, or any reader) ends it
  ThreadCrashError and cancels every child its record lists
  (`api.protocol.records.cascade_cancel`): no child runs on with nobody to follow it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from api.enums import VMTaskResult
from api.errors import TaskNotCancelableError, VMTaskError
from api.protocol import hresults, keys
from api.protocol.records import TaskSnapshot
from api.server import VirtualServer
from api.submitting import ParentLink
from api.task import VMTask
from workers.failures import Cancelled, PeerFailed
from workers.runtime import TaskRun

# How often the parent reads its children (one pipelined round trip for all).
POLL_SECONDS = 0.2


class ChildFailed(PeerFailed):
    """A composite task ends with its first failing child's outcome, and its output."""

    def __init__(self, description: str, result: VMTaskResult, hresult: int,
                 output: Any) -> None:
        super().__init__(description, result, hresult)
        self.partial_output = output


class CompositeCancelled(Cancelled):
    """A composite task ends Cancelled, with what its children did meanwhile."""

    def __init__(self, output: Any) -> None:
        super().__init__("The task was cancelled; its children that could be, were")
        self.partial_output = output


@dataclass
class Child:
    label: str
    """What the child works on (a VM's name): the failure's description names it."""
    task: VMTask
    snapshot: TaskSnapshot | None = None

    @property
    def complete(self) -> bool:
        return self.snapshot is not None and self.snapshot.is_complete


@dataclass(frozen=True)
class Ended:
    """A child's end, or a refusal before it was queued."""

    label: str
    at: float
    result: VMTaskResult
    hresult: int
    description: str
    """Naming what the child worked on: the parent's description if it fails first."""
    detail: str
    """The child's own description of its failure."""

    @property
    def text(self) -> str:
        return f"{hresults.format_hresult(self.hresult)} {self.detail}"


def linked_server(run: TaskRun) -> VirtualServer:
    """A producer inside the parent's worker, whose every submit is the parent's child."""
    server = VirtualServer(run.settings.endpoint.url, poll_interval=POLL_SECONDS)
    root = run.ride_out(lambda: run.redis.hget(keys.task_record(run.task_id), "root"),
                        "reading the task's root")
    server.parent_link = ParentLink(run.task_id, str(root or run.task_id))
    return server


class Composite:
    """The children of one composite task run, and the rules above."""

    def __init__(self, run: TaskRun, server: VirtualServer, planned: int) -> None:
        self.run = run
        self.server = server
        self.planned = max(1, planned)
        self.children: list[Child] = []
        self.ended: list[Ended] = []
        self.cancelled = False

    def __enter__(self) -> Composite:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        """The body failed or was stopped (a Redis that stayed away, the time limit):
        its running children are cancelled before it ends, never left behind."""
        if kind is not None and self.active:
            try:
                self.cancel_children()
            except Exception as exc:  # noqa: BLE001 - the body's own failure is the news
                self.run.log(f"cancel: could not cancel every child: {exc}")

    @property
    def active(self) -> list[Child]:
        return [child for child in self.children if not child.complete]

    def start(self, label: str, submit: Callable[[], VMTask]) -> Child | None:
        """Start one child (``submit`` queues it through `server`); None, and the
        refusal recorded as its failure, when it is refused before being queued."""
        try:
            task = submit()
        except VMTaskError as exc:
            self.run.log(f"{label}: refused before queueing: {exc}")
            self.ended.append(Ended(label, time.time(), VMTaskResult.UnexpectedError,
                                    exc.hresult, f"{label}: {exc.args[0]}", str(exc.args[0])))
            return None
        child = Child(label, task)
        self.children.append(child)
        self.run.log(f"{label}: child task {task.id} started ({task.description})")
        return child

    def poll(self) -> list[Child]:
        """Read every running child (one round trip) and report the aggregate percent;
        the children that ended since the last poll."""
        active = self.active
        snaps = self.run.ride_out(lambda: self.server.task_snapshots([c.task.id for c in active]),
                                  "reading the children")
        newly: list[Child] = []
        for child, snap in zip(active, snaps, strict=True):
            if snap is None:
                continue  # expired: it cannot be; read again
            child.snapshot = snap
            if snap.is_complete:
                newly.append(child)
                self._record_end(child, snap)
        self.report()
        return newly

    def _record_end(self, child: Child, snap: TaskSnapshot) -> None:
        result = snap.result if snap.result is not None else VMTaskResult.UnexpectedError
        self.ended.append(Ended(child.label, snap.finished or time.time(), result, snap.error,
                                f"{child.label}: {snap.error_description}",
                                snap.error_description))
        outcome = result.name if snap.error == 0 else (
            f"{result.name} {hresults.format_hresult(snap.error)} {snap.error_description}")
        self.run.log(f"{child.label}: child task {child.task.id} ended {outcome}")

    def report(self) -> None:
        done = sum(100 if c.complete else (c.snapshot.percent_completed if c.snapshot else 0)
                   for c in self.children)
        done += 100 * sum(1 for e in self.ended if e.label not in
                          {c.label for c in self.children})
        self.run.report_progress(done / self.planned)

    def cancel_children(self) -> None:
        """The cascade: ask every running child to stop; none is started after this."""
        if self.cancelled:
            return
        self.cancelled = True
        self.run.log("cancel: cancelling every child that can still be cancelled")
        for child in self.active:
            try:
                child.task.cancel()
                self.run.log(f"{child.label}: cancel requested of {child.task.id}")
            except TaskNotCancelableError as exc:
                self.run.log(f"{child.label}: not cancelled, it finishes: {exc}")
            except VMTaskError as exc:
                self.run.log(f"{child.label}: could not cancel {child.task.id}: {exc}")

    def wait(self, slots: int | None = None) -> None:
        """Poll until fewer than ``slots`` children run (None: until none does).  A
        cancel of the parent met here cascades to the children at once."""
        limit = 1 if slots is None else slots
        while len(self.active) >= limit:
            if self.run.cancel_requested():
                self.cancel_children()
            self.poll()
            if len(self.active) >= limit:
                time.sleep(POLL_SECONDS)

    def finish(self, output: Any) -> Any:
        """End by the rules: ``output`` on Success; else raise the first failure or
        the cancel, carrying ``output``."""
        self.report()
        if self.cancelled or self.run.cancel_requested():
            self.run.log("ended: cancelled")
            raise CompositeCancelled(output)
        failed = sorted((e for e in self.ended if e.result != VMTaskResult.Success),
                        key=lambda e: e.at)
        if failed:
            first = failed[0]
            self.run.log(f"ended: {len(failed)} failed; the first: {first.text}")
            raise ChildFailed(first.description, first.result, first.hresult, output)
        return output
