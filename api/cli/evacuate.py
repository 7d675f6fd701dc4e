"""``vmtask hosts evacuate``: one live bar for the whole evacuation, a line per move.

Ctrl-C offers to cancel the whole (the parent task), as every verb's follow does
(`api.cli.follow`); the cancel cascades to the moves that can still stop.
"""

from __future__ import annotations

import time

import click
from rich.console import RenderableType
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Task as Row
from rich.table import Column
from rich.text import Text

from api import errors
from api.cli.exits import EXIT_INTERRUPTED
from api.cli.follow import FOLLOW_SLICE_MS, _Detach, _on_interrupt, finish
from api.cli.output import console, stdout_console
from api.cli.state import json_option, no_wait_option, state_of
from api.protocol.records import TaskSnapshot
from api.task import VMTask


class ParentOnly(ProgressColumn):
    """A column shown for the whole's row only; a child's line leaves it blank."""

    def __init__(self, column: ProgressColumn) -> None:
        super().__init__()
        self.column = column

    def render(self, task: Row) -> RenderableType:
        return Text("") if task.fields.get("child") else self.column.render(task)


def child_text(snap: TaskSnapshot) -> str:
    if snap.result is not None:
        return f"  {snap.description}: {snap.result.name}"
    return f"  {snap.description}: {snap.percent_completed}%"


def follow_composite(task: VMTask, quiet: bool) -> TaskSnapshot:
    """Follow a composite task: its bar, then one line per child as it appears."""
    columns = (
        TextColumn("{task.description}", markup=False,
                   table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
        ParentOnly(BarColumn(bar_width=30)),
        ParentOnly(TextColumn("{task.percentage:>3.0f}%")),
        ParentOnly(TimeElapsedColumn()),
        ParentOnly(TimeRemainingColumn()),
    )
    lines: dict[str, TaskID] = {}
    with Progress(*columns, console=console, disable=quiet, expand=True) as progress:
        bar = progress.add_task(task.description, total=100)
        while True:
            try:
                done = task.wait_for_completion(FOLLOW_SLICE_MS)
                snap = task.snapshot()
                progress.update(bar, completed=snap.percent_completed)
                children = task._store.read_many(list(snap.children))
                for child_id, child in zip(snap.children, children, strict=True):
                    if child is None:
                        continue
                    if child_id not in lines:
                        lines[child_id] = progress.add_task("", total=100, child=True)
                    progress.update(lines[child_id], description=child_text(child))
                if done:
                    return snap
            except errors.BrokerUnavailableError:
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


def show_outcome(snap: TaskSnapshot) -> None:
    output = snap.output or {}
    out = stdout_console()
    for vm, host in sorted(output.get("moved", {}).items()):
        out.print(f"moved {vm} -> {host}", markup=False)
    for vm, text in sorted(output.get("failed", {}).items()):
        out.print(f"failed {vm}: {text}", markup=False)


@click.command("evacuate")
@click.argument("host")
@click.option("--to", "destinations", multiple=True, metavar="H",
              help="A destination host (repeat; default: every other live host).")
@click.option("--parallel", type=click.IntRange(1, 16), default=2, show_default=True,
              help="Moves at a time.")
@no_wait_option
@json_option
@click.pass_context
def evacuate(ctx: click.Context, host: str, destinations: tuple[str, ...],
             parallel: int) -> None:
    """Put HOST in maintenance and move every VM off it (live when running or paused),
    least loaded destination first; Ctrl-C offers to cancel the whole."""
    state = state_of(ctx)
    task = state.server().evacuate_host(host, list(destinations) or None, parallel)
    if state.no_wait:
        click.echo(task.id)
        return
    console.print(f"task {task.id}", markup=False)
    snap = follow_composite(task, quiet=state.json)
    if not state.json:
        show_outcome(snap)
    finish(state, snap)
