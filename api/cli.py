"""The ``vmtask`` command: run a worker, run the demo, inspect and control tasks."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from api import errors
from api.enums import VMTaskResult
from api.hresults import format_hresult
from api.records import TaskSnapshot
from api.server import VirtualServer
from api.task import VMTask

console = Console(stderr=True)

# Exit codes: 0 success; 10 + VMTaskResult for a task that did not succeed;
# 2 bad usage or argument; 3 broker unavailable; 4 not found; 1 anything else.
EXIT_TASK_BASE = 10


def exit_code_for(result: VMTaskResult | None) -> int:
    return 0 if result is VMTaskResult.Success else EXIT_TASK_BASE + int(result or 0)


def fail(exc: errors.VMTaskError) -> None:
    console.print(f"[red]error:[/red] {exc}", highlight=False)
    if isinstance(exc, errors.InvalidArgumentError | errors.InvalidTimeoutError):
        sys.exit(2)
    if isinstance(exc, errors.BrokerUnavailableError):
        sys.exit(3)
    if isinstance(exc, errors.NotFoundError | errors.TaskNotFoundError):
        sys.exit(4)
    sys.exit(1)


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
        "result": snap.result.name if snap.result is not None else None,
        "error": snap.error,
        "error_hex": f"0x{snap.error:08X}",
        "error_description": snap.error_description,
        "created": snap.created,
        "started": snap.started,
        "finished": snap.finished,
    }


def follow(task: VMTask, *, quiet: bool = False) -> TaskSnapshot:
    """Show a live progress bar until the task completes; Ctrl-C offers to cancel."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=quiet, transient=False) as progress:
        bar = progress.add_task(task.description, total=100)
        while True:
            try:
                done = task.wait_for_completion(200)
            except KeyboardInterrupt:
                progress.stop()
                if click.confirm(f"Cancel task {task.id}?", default=True, err=True):
                    try:
                        task.cancel()
                    except errors.TaskNotCancelableError as exc:
                        console.print(f"[yellow]{exc}[/yellow]")
                progress.start()
                continue
            snap = task.snapshot()
            progress.update(bar, completed=snap.percent_completed)
            if done:
                return snap


def report(snap: TaskSnapshot, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(snapshot_dict(snap)))
    elif snap.result is VMTaskResult.Success:
        console.print(f"[green]{snap.description}: Success[/green]", highlight=False)
    else:
        result = snap.result.name if snap.result is not None else "?"
        console.print(
            f"[red]{snap.description}: {result} {format_hresult(snap.error)}"
            f" {snap.error_description}[/red]",
            highlight=False,
        )


@click.group()
@click.option("--url", envvar="VMTASK_REDIS_URL", default=None, help="Redis URL.")
@click.option("--host", envvar="VMTASK_HOST", default=None, help="Target worker host.")
@click.pass_context
def main(ctx: click.Context, url: str | None, host: str | None) -> None:
    """vmtask: VM and disk operations as tracked, cancellable tasks."""
    ctx.obj = {"url": url, "host": host}


def server_from(ctx: click.Context) -> VirtualServer:
    return VirtualServer(ctx.obj["url"], ctx.obj["host"])


@main.command()
@click.option("--host", "worker_host", envvar="VMTASK_HOST", required=True,
              help="The host this worker serves (queue host.<NAME>).")
@click.option("--storage-root", envvar="VMTASK_STORAGE_ROOT", default="./var/storage",
              type=click.Path(file_okay=False, path_type=Path), show_default=True)
@click.option("--concurrency", "-c", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option("--loglevel", default="INFO", show_default=True)
@click.pass_context
def worker(ctx: click.Context, worker_host: str, storage_root: Path, concurrency: int,
           loglevel: str) -> None:
    """Run a worker for one host: the same as `celery -A workers worker`."""
    os.environ["VMTASK_HOST"] = worker_host
    os.environ["VMTASK_STORAGE_ROOT"] = str(storage_root.absolute())
    if ctx.obj["url"]:
        os.environ["VMTASK_REDIS_URL"] = ctx.obj["url"]
    from workers import app  # settings are read from the environment at import

    app.worker_main(["worker", "--loglevel", loglevel, "-c", str(concurrency),
                     "-n", f"vmtask-{worker_host}@%h"])


@main.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def wait(ctx: click.Context, task_id: str, as_json: bool) -> None:
    """Follow a task until it completes."""
    try:
        task = server_from(ctx).get_task(task_id)
        snap = follow(task, quiet=as_json)
    except errors.VMTaskError as exc:
        fail(exc)
    report(snap, as_json)
    sys.exit(exit_code_for(snap.result))


@main.command()
@click.option("--duration-ms", default=1000, show_default=True)
@click.option("--steps", default=10, show_default=True)
@click.option("--no-wait", is_flag=True, help="Print the task id and return.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def ping(ctx: click.Context, duration_ms: int, steps: int, no_wait: bool, as_json: bool) -> None:
    """Run the diagnostic task on a host."""
    try:
        task = server_from(ctx).ping(duration_ms=duration_ms, steps=steps)
        if no_wait:
            click.echo(json.dumps({"id": task.id}) if as_json else task.id)
            return
        snap = follow(task, quiet=as_json)
    except errors.VMTaskError as exc:
        fail(exc)
    report(snap, as_json)
    sys.exit(exit_code_for(snap.result))


@main.command()
@click.option("--workdir", default="./var/demo", show_default=True,
              type=click.Path(file_okay=False, path_type=Path))
def demo(workdir: Path) -> None:
    """Start Redis (unless VMTASK_REDIS_URL is set) and a worker, run operations, clean up."""
    from workers.demo import run_demo

    started = time.monotonic()
    run_demo(workdir.absolute(), console, follow)
    console.print(f"[bold]demo finished in {time.monotonic() - started:.1f} s; "
                  "nothing left running[/bold]")


if __name__ == "__main__":
    main()
