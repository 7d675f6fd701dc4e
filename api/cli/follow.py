"""Following a task: the live progress bar, Ctrl-C's offer to cancel, and the report.

`run_task` is the tail of every operation verb: ``--no-wait`` prints the id, else
`follow` shows progress until the task completes and `finish` reports it and exits
with its result's code.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NoReturn

import click
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column

from api import errors
from api.cli.exits import EXIT_INTERRUPTED, EXIT_OK, exit_code_for
from api.cli.output import (
    console,
    elapsed_of,
    emit_json,
    error_line,
    format_duration,
    one_line,
    snapshot_dict,
    task_failure_message,
)
from api.cli.state import CliState
from api.enums import VMTaskResult
from api.protocol.records import TaskSnapshot
from api.task import VMTask

# How often the progress bar is refreshed from the task record while waiting.
FOLLOW_SLICE_MS = 200
# A wait rides out a Redis restart this long before giving up with EXIT_BROKER.
BROKER_GRACE_SECONDS = 30.0


class _Detach(Exception):
    """The user chose to stop waiting; the task keeps running."""


def _on_interrupt(task: VMTask) -> None:
    """Ctrl-C while following: offer to cancel, or to stop waiting if it cannot be."""
    try:
        snap = task.snapshot()
        if snap.is_complete:
            return  # the loop reports it
        if snap.is_cancelable and not snap.cancel_requested:
            if click.confirm(f"Cancel task {task.id} ({snap.description})?", default=True,
                             err=True):
                try:
                    task.cancel()
                    console.print("cancellation requested; waiting for the task to stop")
                except errors.TaskNotCancelableError as exc:
                    click.echo(click.style(one_line(str(exc)), fg="yellow"), err=True)
            return
        why = ("cancellation is already requested" if snap.cancel_requested
               else "this task cannot be cancelled")
        if click.confirm(f"Task {task.id}: {why}. Stop waiting (it keeps running)?",
                         default=False, err=True):
            raise _Detach
    except click.Abort:
        # End of input, or a second Ctrl-C at the prompt: leave without cancelling.
        raise _Detach from None


def follow(task: VMTask, *, quiet: bool = False) -> TaskSnapshot:
    """Show a live progress bar until the task completes; Ctrl-C offers to cancel.

    Exits with EXIT_INTERRUPTED if the user chooses to stop waiting.
    """
    columns = (
        TextColumn("{task.description}", markup=False,
                   table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
        BarColumn(bar_width=30),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    broker_lost_at: float | None = None
    with Progress(*columns, console=console, disable=quiet, transient=False,
                  expand=True) as progress:
        bar = progress.add_task(task.description, total=100)
        while True:
            try:
                done = task.wait_for_completion(FOLLOW_SLICE_MS)
                snap = task.snapshot()
                broker_lost_at = None
                progress.update(bar, completed=snap.percent_completed)
                if done:
                    return snap
            except errors.BrokerAccessDeniedError:
                raise  # a refused login does not heal by waiting
            except errors.BrokerUnavailableError:
                # The task runs on regardless; a Redis restart should not end the wait.
                now = time.monotonic()
                broker_lost_at = broker_lost_at or now
                if now - broker_lost_at > BROKER_GRACE_SECONDS:
                    raise
                time.sleep(0.5)
            except KeyboardInterrupt:
                progress.stop()
                try:
                    _on_interrupt(task)
                except _Detach:
                    console.print(f"stopped waiting; task {task.id} keeps running "
                                  f"(follow it with: vmtask task wait {task.id})")
                    raise SystemExit(EXIT_INTERRUPTED) from None
                progress.start()


def finish(state: CliState, snap: TaskSnapshot,
           extra: Callable[[TaskSnapshot], dict[str, Any]] | None = None,
           show: Callable[[TaskSnapshot], None] | None = None) -> NoReturn:
    """Report a completed task (JSON or a line), then exit with its result's code.

    ``extra`` adds keys to the JSON document whatever the result, so a script finds
    the same keys either way (e.g. "vm": its state after a failed save).
    """
    success = snap.result is VMTaskResult.Success
    if state.json:
        document = snapshot_dict(snap)
        if extra is not None:
            document.update(extra(snap))
        emit_json(document)
    elif success:
        click.echo(f"{snap.description}: Success ({format_duration(elapsed_of(snap))}, "
                   f"task {snap.id})")
        if show is not None:
            show(snap)
    if not success:
        error_line(task_failure_message(snap))
    raise SystemExit(exit_code_for(snap.result))


def run_task(state: CliState, task: VMTask,
             extra: Callable[[TaskSnapshot], dict[str, Any]] | None = None,
             show: Callable[[TaskSnapshot], None] | None = None) -> NoReturn:
    """The tail of every operation verb: --no-wait, or follow and report."""
    if state.no_wait:
        if state.json:
            emit_json({"id": task.id})
        else:
            click.echo(task.id)
        raise SystemExit(EXIT_OK)
    finish(state, follow(task, quiet=state.json), extra, show)
