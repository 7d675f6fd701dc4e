"""Output: the stderr console, the JSON document on stdout, and formatting for people.

stdout carries the result only (a table, lines, or one JSON document); progress,
prompts and errors go to `console`, on stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.table import Column, Table

from api.protocol.hresults import format_hresult
from api.protocol.records import TaskSnapshot

# Progress, prompts and errors: never on stdout, which belongs to the result.  When
# piped or captured it is as wide as a log line, so the bar keeps its description.
console = Console(stderr=True, highlight=False,
                  width=None if sys.stderr.isatty() or "COLUMNS" in os.environ else 120)


def stdout_console() -> Console:
    # Piped output gets a generous width so tables are not cut at 80 columns.
    wide = sys.stdout.isatty() or "COLUMNS" in os.environ
    return Console(highlight=False, width=None if wide else 200)


def emit_json(document: Any) -> None:
    indent = 2 if sys.stdout.isatty() else None
    click.echo(json.dumps(document, indent=indent, default=str))


def one_line(text: str) -> str:
    # Error texts may carry qemu-img's multi-line stderr; the contract is one line.
    return " ".join(str(text).split())


def error_line(message: str) -> None:
    click.echo(f"{click.style('vmtask: error:', fg='red', bold=True)} {one_line(message)}",
               err=True)


def format_time(stamp: float | None) -> str:
    return datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M:%S") if stamp else "-"


def format_clock(stamp: float | None, now: float) -> str:
    """A table's time: the clock for today, the date too for older ones."""
    if not stamp:
        return "-"
    moment = datetime.fromtimestamp(stamp)
    same_day = moment.date() == datetime.fromtimestamp(now).date()
    return moment.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M")


def new_table(*columns: str | Column, title: str | None = None) -> Table:
    # No outer edges or padding: lines stay short enough for an 80-column terminal.
    return Table(*columns, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                 title=title, title_justify="left", title_style="bold")


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_bytes(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PiB"


def elapsed_of(snap: TaskSnapshot, now: float | None = None) -> float | None:
    if snap.started is None:
        return None
    end = snap.finished if snap.finished is not None else (now or time.time())
    return max(0.0, end - snap.started)


def snapshot_dict(snap: TaskSnapshot) -> dict[str, Any]:
    return {
        "id": snap.id,
        "name": snap.name,
        "description": snap.description,
        "host": snap.host,
        "state": snap.state,
        "percent_completed": snap.percent_completed,
        "is_complete": snap.is_complete,
        "is_cancelable": snap.is_cancelable,
        "cancel_requested": snap.cancel_requested,
        "result": snap.result.name if snap.result is not None else None,
        "result_code": int(snap.result) if snap.result is not None else None,
        "error": snap.error,
        "error_hex": f"0x{snap.error:08X}",
        "error_description": snap.error_description,
        "created": snap.created,
        "started": snap.started,
        "finished": snap.finished,
        "elapsed_seconds": elapsed_of(snap),
        "output": snap.output,
        "parent": snap.parent,
        "children": list(snap.children),
    }


def task_failure_message(snap: TaskSnapshot) -> str:
    result = snap.result.name if snap.result is not None else "UnexpectedError"
    detail = f": {snap.error_description}" if snap.error_description else ""
    return f"{snap.description}: {result}{detail} [{format_hresult(snap.error)}]"

