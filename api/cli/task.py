"""The ``task`` verbs (and ``wait``): inspect, follow, cancel and list tasks by id."""

from __future__ import annotations

import json
import time

import click
from rich.table import Column, Table

from api.cli.exits import EXIT_INTERRUPTED, EXIT_NOT_FOUND, exit_code_for
from api.cli.follow import finish, follow
from api.cli.output import (
    elapsed_of,
    emit_json,
    format_clock,
    format_duration,
    format_time,
    new_table,
    snapshot_dict,
    stdout_console,
)
from api.cli.state import json_option, state_of
from api.logs import follow_log
from api.protocol.hresults import format_hresult
from api.protocol.records import TaskSnapshot

TASK_STATES = ("PENDING", "STARTED", "SUCCESS", "FAILURE", "REVOKED")


@click.group()
def task() -> None:
    """Tasks: inspect, follow, cancel, list (from any machine, by id)."""


def child_line(child_id: str, snap: TaskSnapshot | None) -> str:
    if snap is None:
        return f"{child_id} (expired)"
    outcome = snap.result.name if snap.result is not None else f"{snap.percent_completed}%"
    return f"{child_id} {snap.state} {outcome} {snap.description}"


def print_task(snap: TaskSnapshot, children: list[TaskSnapshot | None] | None = None) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    rows = [
        ("id", snap.id),
        ("description", snap.description),
        ("operation", snap.name),
        ("host", snap.host),
        ("state", snap.state + (" (cancel requested)" if snap.cancel_requested
                                and not snap.is_complete else "")),
        ("percent", f"{snap.percent_completed}%"),
        ("cancelable", "yes" if snap.is_cancelable else "no"),
        ("result", snap.result.name if snap.result is not None else "-"),
        ("error", format_hresult(snap.error)),
        ("error text", snap.error_description or "-"),
        ("created", format_time(snap.created)),
        ("started", format_time(snap.started)),
        ("finished", format_time(snap.finished)),
        ("elapsed", format_duration(elapsed_of(snap))),
    ]
    if snap.parent:
        rows.append(("parent", snap.parent))
    if snap.children:
        shown = children if children is not None else [None] * len(snap.children)
        rows.append(("children", "\n".join(
            child_line(child_id, child) if children is not None else child_id
            for child_id, child in zip(snap.children, shown, strict=True))))
    for label, value in rows:
        grid.add_row(label, value)
    stdout_console().print(grid)


@task.command("show")
@click.argument("task_ids", nargs=-1, required=True)
@json_option
@click.pass_context
def task_show(ctx: click.Context, task_ids: tuple[str, ...]) -> None:
    """Every IVMTask2 property of tasks, read at one instant (exit 0 if all exist).

    Several ids are read in one round trip; with --json they print as a list, with
    null for an unknown id.
    """
    state = state_of(ctx)
    if len(task_ids) == 1:
        one = state.server().get_task(task_ids[0]).snapshot()
        if state.json:
            emit_json(snapshot_dict(one))
        else:
            print_task(one, state.server().task_snapshots(list(one.children))
                       if one.children else None)
        return
    snaps = state.server().task_snapshots(task_ids)
    if state.json:
        emit_json([None if s is None else snapshot_dict(s) for s in snaps])
    else:
        for task_id, snap in zip(task_ids, snaps, strict=True):
            if snap is None:
                stdout_console().print(f"{task_id}: no such task (unknown, or expired)")
            else:
                print_task(snap)
    if any(snap is None for snap in snaps):
        # Every id was answered above (unknown ones as null): no second document.
        ctx.exit(EXIT_NOT_FOUND)


def _wait(ctx: click.Context, task_id: str) -> None:
    state = state_of(ctx)
    finish(state, follow(state.server().get_task(task_id), quiet=state.json))


@task.command("wait")
@click.argument("task_id")
@json_option
@click.pass_context
def task_wait(ctx: click.Context, task_id: str) -> None:
    """Follow a task until it completes; exit with its result's code."""
    _wait(ctx, task_id)


@click.command("wait")
@click.argument("task_id")
@json_option
@click.pass_context
def wait(ctx: click.Context, task_id: str) -> None:
    """Same as 'task wait'."""
    _wait(ctx, task_id)


@task.command("cancel")
@click.argument("task_id")
@click.option("--wait", "then_wait", is_flag=True,
              help="Then follow the task until it stops; exit with its result's code.")
@json_option
@click.pass_context
def task_cancel(ctx: click.Context, task_id: str, then_wait: bool) -> None:
    """Cancel a queued task, or ask a running cancelable one to stop."""
    state = state_of(ctx)
    handle = state.server().get_task(task_id)
    handle.cancel()
    if then_wait:
        finish(state, follow(handle, quiet=state.json))
    snap = handle.snapshot()
    if state.json:
        emit_json(snapshot_dict(snap))
    elif snap.is_complete:
        click.echo(f"Task {task_id} cancelled before it started")
    else:
        click.echo(f"Cancellation of task {task_id} requested; it stops shortly "
                   f"(follow it with: vmtask task wait {task_id})")


@task.command("log")
@click.argument("task_id")
@click.option("-f", "--follow", "follow_live", is_flag=True,
              help="Then print each new line as it is written until the task ends; "
                   "exit with its result's code.")
@click.option("--tail", type=click.IntRange(0, None), default=None,
              help="Only the last N lines (then, with -f, the new ones).")
@json_option
@click.pass_context
def task_log(ctx: click.Context, task_id: str, follow_live: bool, tail: int | None) -> None:
    """The time-stamped lines a task's operation wrote (start, phases, commands, QEMU
    events, retries, warnings, its end).  With --json: a list of lines; with -f too,
    one JSON string per line as they come."""
    state = state_of(ctx)
    handle = state.server().get_task(task_id)
    if not follow_live:
        lines = handle.log(tail)
        if state.json:
            emit_json(lines)
        else:
            for line in lines:
                click.echo(line)
        return
    try:
        for line in follow_log(handle, tail=tail):
            click.echo(json.dumps(line) if state.json else line)
    except KeyboardInterrupt:
        raise SystemExit(EXIT_INTERRUPTED) from None
    raise SystemExit(exit_code_for(handle.snapshot().result))


@task.command("list")
@click.option("--state", "task_state", type=click.Choice(TASK_STATES, case_sensitive=False),
              help="Only tasks in this record state.")
@click.option("--host", "task_host",
              help="Only tasks of this host (the global --host does not filter the list).")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@json_option
@click.pass_context
def task_list(ctx: click.Context, task_state: str | None, task_host: str | None,
              limit: int) -> None:
    """Recent tasks, newest first (running, queued, and completed ones still kept)."""
    state = state_of(ctx)
    snaps = state.server().tasks(state=task_state.upper() if task_state else None,
                                 host=task_host, limit=limit)
    if state.json:
        emit_json([snapshot_dict(s) for s in snaps])
        return
    now = time.time()
    rows = [(snap.id, snap.description, snap.state, f"{snap.percent_completed}",
             snap.result.name if snap.result is not None else "-",
             format_clock(snap.started, now), format_duration(elapsed_of(snap, now)))
            for snap in snaps]
    headers = ("id", "description", "state", "%", "result", "started", "elapsed")
    out = stdout_console()
    # Every column but the description keeps its full width (the id is what 'task
    # show' takes); the description gets what is left of the line, and an ellipsis.
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    gaps = 3 * (len(headers) - 1)  # padding on both sides, and the divider
    room = max(12, out.width - gaps - sum(w for i, w in enumerate(widths) if i != 1))
    table = new_table(*(
        Column(h, no_wrap=True, justify="right" if h in ("%", "elapsed") else "left",
               overflow="ellipsis", min_width=min(w, 12) if i == 1 else w,
               max_width=room if i == 1 else None)
        for i, (h, w) in enumerate(zip(headers, widths, strict=True))))
    for row in rows:
        table.add_row(*row)
    out.print(table if snaps else "no tasks")

