"""The ``vmtask`` command: every operation of the public API, plus ``worker`` and ``demo``.

    vmtask disk create|info|convert|compact|merge|merge-to ...
    vmtask vm create|list|show|start|save|pause|resume|reset|off|shutdown|restart|logoff|
              merge-undo|discard-undo|delete ...
    vmtask task show|wait|cancel|list ...
    vmtask hosts | ping | wait | worker | demo

Output contract, so that scripts can rely on it:

* stdout carries the result only: lines and tables for people, or exactly one JSON
  document with ``--json`` (accepted by every verb, and before the verb).
* stderr carries everything else: the live progress bar, prompts, and errors, each
  error on one line with its HRESULT.  Never a traceback.
* ``--no-wait`` prints only the new task's id (``{"id": ...}`` with ``--json``).

Exit codes: see `EXIT_CODES`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import click
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column, Table

from api import errors
from api.disks import HardDisk
from api.enums import VMHardDiskType, VMTaskResult, VMVMState
from api.protocol import hresults, keys
from api.protocol.hresults import format_hresult
from api.protocol.records import STARTED, TaskSnapshot
from api.server import VirtualServer
from api.settings import redact_url
from api.store import broker_errors
from api.task import VMTask
from api.vms import VirtualMachine

# Progress, prompts and errors: never on stdout, which belongs to the result.  When
# piped or captured it is as wide as a log line, so the bar keeps its description.
console = Console(stderr=True, highlight=False,
                  width=None if sys.stderr.isatty() or "COLUMNS" in os.environ else 120)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_BROKER = 3
EXIT_NOT_FOUND = 4
EXIT_TASK_BASE = 10
EXIT_INTERRUPTED = 130

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success (for a task: VMTaskResult.Success)",
    EXIT_ERROR: "an unexpected error, or a synchronous query that failed",
    EXIT_USAGE: "refused before anything was queued: bad usage or argument (E_INVALIDARG), "
                "a state that forbids the operation, a task that cannot be cancelled",
    EXIT_BROKER: "Redis cannot be reached",
    EXIT_NOT_FOUND: "no such task, disk, VM or live host",
    **{EXIT_TASK_BASE + int(r): f"the task ended {r.name}" for r in VMTaskResult if r},
    EXIT_INTERRUPTED: "interrupted: stopped waiting (a task left running keeps running)",
}

# How often the progress bar is refreshed from the task record while waiting.
FOLLOW_SLICE_MS = 200
# A wait rides out a Redis restart this long before giving up with EXIT_BROKER.
BROKER_GRACE_SECONDS = 30.0

TYPE_CHOICES = {"dynamic": VMHardDiskType.Dynamic, "fixed": VMHardDiskType.FixedSize,
                "fixed-size": VMHardDiskType.FixedSize}
REDIS_SCHEMES = ("redis", "rediss", "unix")
TASK_STATES = ("PENDING", "STARTED", "SUCCESS", "FAILURE", "REVOKED")
# What `vmtask hosts` counts as a running VM, as the workers' heartbeat does.
RUNNING_VM_STATES = frozenset({VMVMState.Running, VMVMState.Paused})


# -- state shared by the command tree ---------------------------------------------


@dataclass
class CliState:
    """The root options, the output flags and the one `VirtualServer` of a run.

    It is the click context's ``obj``, shared by every level of the tree, so the
    error handler at the root knows whether ``--json`` was asked for below it.
    """

    url: str | None = None
    host: str | None = None
    json: bool = False
    no_wait: bool = False
    _server: VirtualServer | None = field(default=None, repr=False)

    def server(self) -> VirtualServer:
        if self._server is None:
            self._server = VirtualServer(self.url, self.host)
        return self._server

    def close(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            try:
                server.close()
            except errors.VMTaskError:
                pass  # closing a connection to a Redis that went away is not an error


def state_of(ctx: click.Context) -> CliState:
    return ctx.ensure_object(CliState)


def _flag_setter(name: str) -> Callable[[click.Context, click.Parameter, bool], bool]:
    def callback(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
        # Only ever set: "--json" before the verb must survive the verb's own default.
        if value:
            setattr(state_of(ctx), name, True)
        return value
    return callback


# Eager, so the flag is known even when a later parameter fails to parse.
json_option = click.option(
    "--json", "as_json", is_flag=True, expose_value=False, is_eager=True,
    callback=_flag_setter("json"),
    help="Print one JSON document on stdout; progress and errors stay on stderr.")
no_wait_option = click.option(
    "--no-wait", is_flag=True, expose_value=False, callback=_flag_setter("no_wait"),
    help="Print the task id and return at once; follow it later with 'task wait'.")


# -- output helpers ---------------------------------------------------------------


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


def exit_code_for(result: VMTaskResult | None) -> int:
    if result is VMTaskResult.Success:
        return EXIT_OK
    # None cannot happen for a complete task; treat it as UnexpectedError, not success.
    return EXIT_TASK_BASE + int(result if result is not None else VMTaskResult.UnexpectedError)


def exit_code_for_error(exc: errors.VMTaskError) -> int:
    if isinstance(exc, errors.BrokerUnavailableError):
        return EXIT_BROKER
    if isinstance(exc, errors.NotFoundError | errors.TaskNotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(exc, errors.InvalidArgumentError | errors.InvalidTimeoutError
                  | errors.InvalidStateError | errors.TaskNotCancelableError):
        return EXIT_USAGE
    return EXIT_ERROR


def report_failure(state: CliState, kind: str, message: str, hresult: int, code: int) -> int:
    """One line on stderr; with --json, also the error as the JSON document on stdout."""
    error_line(message)
    if state.json:
        emit_json({"error": {"type": kind, "message": one_line(message), "hresult": hresult,
                             "hresult_hex": f"0x{hresult:08X}", "exit_code": code}})
    return code


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
    }


def task_failure_message(snap: TaskSnapshot) -> str:
    result = snap.result.name if snap.result is not None else "UnexpectedError"
    detail = f": {snap.error_description}" if snap.error_description else ""
    return f"{snap.description}: {result}{detail} [{format_hresult(snap.error)}]"


# -- following a task -------------------------------------------------------------


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


# -- the root of the command tree ---------------------------------------------------


class VMTaskCLI(click.Group):
    """Turns every failure into one line on stderr and an exit code (see `EXIT_CODES`)."""

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        state = extra.setdefault("obj", CliState())
        if parent is None:
            info_name = "vmtask"  # not "python -m api.cli" in messages
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            raise click.exceptions.Exit(usage_failure(state, exc)) from None

    def invoke(self, ctx: click.Context) -> Any:
        state = state_of(ctx)
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.exceptions.NoArgsIsHelpError):
            raise
        except click.UsageError as exc:
            raise click.exceptions.Exit(usage_failure(state, exc)) from None
        except click.ClickException:
            raise
        except errors.VMTaskError as exc:
            code = exit_code_for_error(exc)
            raise click.exceptions.Exit(
                report_failure(state, type(exc).__name__, str(exc), exc.hresult, code)) from None
        except KeyboardInterrupt:
            click.echo("vmtask: interrupted", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:  # noqa: BLE001 - the contract: one line, never a traceback
            message = f"unexpected {type(exc).__name__}: {exc} " \
                      f"[{format_hresult(hresults.E_UNEXPECTED)}]"
            raise click.exceptions.Exit(report_failure(
                state, type(exc).__name__, message, hresults.E_UNEXPECTED, EXIT_ERROR)) from None
        finally:
            state.close()


def usage_failure(state: CliState, exc: click.UsageError) -> int:
    where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
    message = f"{exc.format_message()} [{format_hresult(hresults.E_INVALIDARG)}]{where}"
    return report_failure(state, "UsageError", message, hresults.E_INVALIDARG, EXIT_USAGE)


def _check_url(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    # redis-py would raise a bare ValueError deep inside; this is a usage error.
    if value and urlsplit(value).scheme not in REDIS_SCHEMES:
        raise click.BadParameter(
            f"{redact_url(value)!r} is not a Redis URL ({', '.join(REDIS_SCHEMES)})")
    return value


@click.group(cls=VMTaskCLI, context_settings={"help_option_names": ["-h", "--help"]},
             epilog="Exit codes: " + "; ".join(f"{c} {t}" for c, t in EXIT_CODES.items()))
@click.option("--url", envvar="VMTASK_REDIS_URL", default=None, callback=_check_url,
              help="Redis URL (env VMTASK_REDIS_URL; default redis://127.0.0.1:6379/0).")
@click.option("--host", envvar="VMTASK_HOST", default=None,
              help="Target worker host (env VMTASK_HOST; default: the only live host).")
@json_option
@click.pass_context
def main(ctx: click.Context, url: str | None, host: str | None) -> None:
    """vmtask: VM and disk operations as tracked, cancellable tasks.

    Long operations show a live progress bar; Ctrl-C offers to cancel the task.
    """
    state = state_of(ctx)
    state.url, state.host = url, host


# -- disks ------------------------------------------------------------------------


def disk_dict(disk: HardDisk) -> dict[str, Any]:
    return {
        "host": disk.host,
        "file": disk.file,
        "type": disk.type.name,
        "type_code": int(disk.type),
        "format": disk.format,
        "size_in_guest": disk.size_in_guest,
        "size_on_host": disk.size_on_host,
        "host_free_disk_space": disk.host_free_disk_space,
        "host_drive": disk.host_drive,
        "parent": disk_dict(disk.parent) if disk.parent is not None else None,
    }


def print_disk(disk: HardDisk) -> None:
    table = new_table("file", "type", "format", "size in guest", "size on host", "host drive",
                      title=f"{disk.file} on host {disk.host}")
    link: HardDisk | None = disk
    depth = 0
    while link is not None:
        table.add_row(("  " * depth) + ("└ " if depth else "") + link.file, link.type.name,
                      link.format, format_bytes(link.size_in_guest),
                      format_bytes(link.size_on_host), link.host_drive or "")
        link, depth = link.parent, depth + 1
    out = stdout_console()
    out.print(table)
    out.print(f"free space on the host's storage: {format_bytes(disk.host_free_disk_space)}")


def disk_from_output(server: VirtualServer, snap: TaskSnapshot) -> HardDisk | None:
    if not isinstance(snap.output, dict) or "chain" not in snap.output:
        return None
    return HardDisk.from_info(server, snap.host, snap.output)


def run_disk_task(state: CliState, task: VMTask) -> NoReturn:
    """A disk operation's task; the resulting disk is shown on success ("disk": null else)."""
    server = state.server()

    def extra(snap: TaskSnapshot) -> dict[str, Any]:
        disk = disk_from_output(server, snap)
        return {"disk": disk_dict(disk) if disk is not None else None}

    def show(snap: TaskSnapshot) -> None:
        disk = disk_from_output(server, snap)
        if disk is not None:
            print_disk(disk)

    run_task(state, task, extra, show)


@main.group()
def disk() -> None:
    """Virtual hard disks (paths are relative to the host's storage root)."""


@disk.command("create")
@click.argument("path")
@click.option("--size-mb", type=int, help="Size of a new fixed or dynamic disk, in MB.")
@click.option("--type", "disk_type", type=click.Choice(["fixed", "dynamic"]),
              help="With --size-mb: fixed (fully allocated) or dynamic (sparse; default).")
@click.option("--parent", help="Create a differencing (.qcow2) disk over this parent.")
@click.option("--host-drive", help="Create a disk bound to this host device or file.")
@click.option("--read-write", is_flag=True, help="With --host-drive: allow writes.")
@no_wait_option
@json_option
@click.pass_context
def disk_create(ctx: click.Context, path: str, size_mb: int | None, disk_type: str | None,
                parent: str | None, host_drive: str | None, read_write: bool) -> None:
    """Create PATH: --size-mb N [--type], or --parent P, or --host-drive DEV."""
    kinds = [name for name, value in (("--size-mb", size_mb), ("--parent", parent),
                                      ("--host-drive", host_drive)) if value is not None]
    if len(kinds) != 1:
        raise click.UsageError("give exactly one of --size-mb, --parent or --host-drive", ctx)
    if disk_type is not None and size_mb is None:
        raise click.UsageError("--type goes with --size-mb", ctx)
    if read_write and host_drive is None:
        raise click.UsageError("--read-write goes with --host-drive", ctx)
    state = state_of(ctx)
    server = state.server()
    if size_mb is not None:
        if disk_type == "fixed":
            task = server.create_fixed_virtual_hard_disk(path, size_mb)
        else:
            task = server.create_dynamic_virtual_hard_disk(path, size_mb)
    elif parent is not None:
        task = server.create_differencing_virtual_hard_disk(path, parent)
    else:
        assert host_drive is not None
        task = server.create_host_drive_virtual_hard_disk(path, host_drive,
                                                          read_only=not read_write)
    run_disk_task(state, task)


@disk.command("info")
@click.argument("path")
@json_option
@click.pass_context
def disk_info(ctx: click.Context, path: str) -> None:
    """Show PATH: type, sizes, and its chain of parents."""
    hard_disk = state_of(ctx).server().get_hard_disk(path)
    if state_of(ctx).json:
        emit_json(disk_dict(hard_disk))
    else:
        print_disk(hard_disk)


def type_option(required: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--type", "disk_type", type=click.Choice(sorted(TYPE_CHOICES)),
                        required=required, help="The new disk's type.")


@disk.command("convert")
@click.argument("path")
@click.argument("destination")
@type_option(required=True)
@no_wait_option
@json_option
@click.pass_context
def disk_convert(ctx: click.Context, path: str, destination: str, disk_type: str) -> None:
    """Copy PATH into a new DESTINATION disk of another type or format."""
    state = state_of(ctx)
    source = state.server().get_hard_disk(path)
    run_disk_task(state, source.convert(destination, TYPE_CHOICES[disk_type]))


@disk.command("compact")
@click.argument("path")
@no_wait_option
@json_option
@click.pass_context
def disk_compact(ctx: click.Context, path: str) -> None:
    """Reclaim the unused space of PATH (rewritten, then swapped in atomically)."""
    state = state_of(ctx)
    run_disk_task(state, state.server().get_hard_disk(path).compact())


@disk.command("merge")
@click.argument("path")
@no_wait_option
@json_option
@click.pass_context
def disk_merge(ctx: click.Context, path: str) -> None:
    """Merge the differencing disk PATH into its parent (cannot be cancelled)."""
    state = state_of(ctx)
    run_disk_task(state, state.server().get_hard_disk(path).merge())


@disk.command("merge-to")
@click.argument("path")
@click.argument("destination")
@type_option(required=True)
@no_wait_option
@json_option
@click.pass_context
def disk_merge_to(ctx: click.Context, path: str, destination: str, disk_type: str) -> None:
    """Merge PATH and all its parents into a new DESTINATION disk."""
    state = state_of(ctx)
    source = state.server().get_hard_disk(path)
    run_disk_task(state, source.merge_to(destination, TYPE_CHOICES[disk_type]))


# -- virtual machines ---------------------------------------------------------------


def vm_dict(vm: VirtualMachine) -> dict[str, Any]:
    state = vm.state
    return {
        "name": vm.name,
        "host": vm.host,
        "state": state.name,
        "state_code": int(state),
        "memory_mb": vm.memory_mb,
        "disks": list(vm.disks),
        "undoable": vm.undoable,
        "guest_agent": vm.guest_agent,
    }


def find_vm(state: CliState, name: str) -> VirtualMachine:
    vm = state.server().find_virtual_machine(name)
    if vm is None:
        raise errors.NotFoundError(f"No VM named {name!r}")
    return vm


def print_vm(info: dict[str, Any]) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for label, key in (("name", "name"), ("host", "host"), ("state", "state"),
                       ("memory", "memory_mb"), ("undoable", "undoable"),
                       ("guest agent", "guest_agent")):
        value = info[key]
        if key == "memory_mb":
            value = f"{value} MB"
        elif isinstance(value, bool):
            value = "yes" if value else "no"
        grid.add_row(label, str(value))
    grid.add_row("disks", ", ".join(info["disks"]) or "-")
    stdout_console().print(grid)


@main.group()
def vm() -> None:
    """Virtual machines: QEMU processes on a worker host."""


@vm.command("create")
@click.argument("name")
@click.option("--memory-mb", type=int, default=128, show_default=True)
@click.option("--disk", "disks", multiple=True,
              help="A disk to attach (relative to the storage root); repeatable, in order.")
@click.option("--undoable", is_flag=True, help="Keep changes in undo disks until merged.")
@click.option("--kernel", help="Boot this kernel directly (relative to the storage root).")
@click.option("--initrd", help="With --kernel: this initrd.")
@click.option("--append", help="With --kernel: the kernel command line.")
@click.option("--guest-agent", is_flag=True, help="The guest runs the QEMU guest agent.")
@json_option
@click.pass_context
def vm_create(ctx: click.Context, name: str, memory_mb: int, disks: tuple[str, ...],
              undoable: bool, kernel: str | None, initrd: str | None, append: str | None,
              guest_agent: bool) -> None:
    """Register a new VM, turned off, on the target host."""
    state = state_of(ctx)
    created = state.server().create_virtual_machine(
        name, memory_mb, disks, undoable, host=state.host, kernel=kernel, initrd=initrd,
        append=append, guest_agent=guest_agent)
    info = vm_dict(created)
    if state.json:
        emit_json(info)
    else:
        click.echo(f"Created VM {created.name} on host {created.host}")
        print_vm(info)


@vm.command("list")
@json_option
@click.pass_context
def vm_list(ctx: click.Context) -> None:
    """Every VM, on every host."""
    state = state_of(ctx)
    infos = [vm_dict(v) for v in state.server().virtual_machines]
    if state.json:
        emit_json(infos)
        return
    table = new_table("name", "host", "state", "memory", "disks", "undoable")
    for info in infos:
        table.add_row(info["name"], info["host"], info["state"], f"{info['memory_mb']} MB",
                      ", ".join(info["disks"]) or "-", "yes" if info["undoable"] else "no")
    stdout_console().print(table if infos else "no VMs")


@vm.command("show")
@click.argument("name")
@json_option
@click.pass_context
def vm_show(ctx: click.Context, name: str) -> None:
    """Configuration and live state of VM NAME."""
    state = state_of(ctx)
    info = vm_dict(find_vm(state, name))
    if state.json:
        emit_json(info)
    else:
        print_vm(info)


# verb -> (help, a VirtualMachine method, or a guest OS request that takes a timeout)
VM_ACTIONS: dict[str, tuple[str, Callable[[VirtualMachine], VMTask] | None,
                            Callable[[VirtualMachine, int], VMTask] | None]] = {
    "start": ("Boot a turned-off VM, or restore a saved one.", VirtualMachine.startup, None),
    "save": ("Save a running VM's state to disk and stop it.", VirtualMachine.save, None),
    "pause": ("Pause a running VM.", VirtualMachine.pause, None),
    "resume": ("Resume a paused VM.", VirtualMachine.resume, None),
    "reset": ("Hard-reset a running VM.", VirtualMachine.reset, None),
    "off": ("Turn a VM off at once (pulls the plug; a saved state is discarded).",
            VirtualMachine.turn_off, None),
    "shutdown": ("Ask the guest OS to shut down.", None,
                 lambda machine, timeout_s: machine.guest_os.shutdown(timeout_s)),
    "restart": ("Ask the guest OS to restart.", None,
                lambda machine, timeout_s: machine.guest_os.restart(timeout_s)),
    "logoff": ("Ask the guest OS to log the user off.", None,
               lambda machine, timeout_s: machine.guest_os.logoff(timeout_s)),
    "merge-undo": ("Merge an undoable VM's undo disks into its disks.",
                   VirtualMachine.merge_undo_disks, None),
    "discard-undo": ("Discard an undoable VM's undo disks.",
                     VirtualMachine.discard_undo_disks, None),
    "delete": ("Delete a turned-off or saved VM (its disks are kept).",
               VirtualMachine.delete, None),
}


def _vm_action_command(verb: str, help_text: str,
                       plain: Callable[[VirtualMachine], VMTask] | None,
                       guest: Callable[[VirtualMachine, int], VMTask] | None) -> click.Command:
    @click.pass_context
    def command(ctx: click.Context, name: str, timeout_s: int = 0) -> None:
        state = state_of(ctx)
        machine = find_vm(state, name)
        if guest is not None:
            task = guest(machine, timeout_s)
        else:
            assert plain is not None
            task = plain(machine)

        def extra(_snap: TaskSnapshot) -> dict[str, Any]:
            after = state.server().find_virtual_machine(name)
            return {"vm": vm_dict(after) if after is not None else None}

        def show(_snap: TaskSnapshot) -> None:
            after = state.server().find_virtual_machine(name)
            click.echo(f"VM {name} is now {after.state.name if after is not None else 'gone'}")

        run_task(state, task, extra, show)

    params: list[click.Parameter] = [click.Argument(["name"])]
    if guest is not None:
        params.append(click.Option(["--timeout-s"], type=click.IntRange(1, 3600), default=120,
                                   show_default=True,
                                   help="How long the guest may take (else TimeOutError)."))
    built = click.Command(verb, callback=command, params=params, help=f"{help_text}\n\n"
                          "NAME is the VM's name.")
    return no_wait_option(json_option(built))


for _verb, (_help, _plain, _guest_call) in VM_ACTIONS.items():
    vm.add_command(_vm_action_command(_verb, _help, _plain, _guest_call))


# -- tasks ------------------------------------------------------------------------


@main.group()
def task() -> None:
    """Tasks: inspect, follow, cancel, list (from any machine, by id)."""


def print_task(snap: TaskSnapshot) -> None:
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
    for label, value in rows:
        grid.add_row(label, value)
    stdout_console().print(grid)


@task.command("show")
@click.argument("task_id")
@json_option
@click.pass_context
def task_show(ctx: click.Context, task_id: str) -> None:
    """Every IVMTask2 property of a task, read at one instant (exit 0 if it exists)."""
    state = state_of(ctx)
    snap = state.server().get_task(task_id).snapshot()
    if state.json:
        emit_json(snapshot_dict(snap))
    else:
        print_task(snap)


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


@main.command("wait")
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


# -- hosts, diagnostics, worker, demo ----------------------------------------------------


def running_tasks_by_host(server: VirtualServer) -> dict[str, int]:
    """Started, unfinished tasks per host, from the set the workers keep."""
    with broker_errors(server.url):
        running = sorted(server.redis.smembers(keys.RUNNING_TASKS))
    counts: dict[str, int] = {}
    for snap in server.store.read_many(running) if running else []:
        if snap.state == STARTED:
            counts[snap.host] = counts.get(snap.host, 0) + 1
    return counts


def vms_by_host(server: VirtualServer) -> dict[str, tuple[int, int]]:
    """(running or paused VMs, all VMs) per host."""
    counts: dict[str, tuple[int, int]] = {}
    for machine in server.virtual_machines:
        live, total = counts.get(machine.host, (0, 0))
        try:
            is_live = machine.state in RUNNING_VM_STATES
        except errors.NotFoundError:
            continue  # deleted meanwhile
        counts[machine.host] = (live + int(is_live), total + 1)
    return counts


def host_rows(server: VirtualServer) -> list[dict[str, Any]]:
    live = server.hosts
    status = server.host_status()
    beats = [status.get(name, {}) for name in live]
    # Workers put these counters in their heartbeat; count them here only for a
    # worker that does not (an older one), which costs a few more round trips.
    tasks: dict[str, int] | None = None
    if any("tasks_running" not in beat for beat in beats):
        tasks = running_tasks_by_host(server)
    machines: dict[str, tuple[int, int]] | None = None
    if any("vms" not in beat or "vms_running" not in beat for beat in beats):
        machines = vms_by_host(server)
    now = time.time()
    rows: list[dict[str, Any]] = []
    for name, beat in zip(live, beats, strict=True):
        heartbeat = beat.get("heartbeat")
        counted_vms = machines.get(name, (0, 0)) if machines is not None else (0, 0)
        rows.append({
            "host": name,
            "heartbeat_age_seconds": round(now - heartbeat, 3) if heartbeat else None,
            "machine": beat.get("machine"),
            "pid": beat.get("pid"),
            "started": beat.get("started"),
            "storage_root": beat.get("storage_root"),
            "storage_free_bytes": beat.get("storage_free_bytes"),
            "running_tasks": beat.get("tasks_running",
                                      tasks.get(name, 0) if tasks is not None else None),
            "vms": beat.get("vms", counted_vms[1]),
            "running_vms": beat.get("vms_running", counted_vms[0]),
            "status": beat,
        })
    return rows


@main.command()
@json_option
@click.pass_context
def hosts(ctx: click.Context) -> None:
    """Live worker hosts: heartbeat, free storage, running tasks and VMs."""
    state = state_of(ctx)
    rows = host_rows(state.server())
    if state.json:
        emit_json(rows)
        return
    table = new_table(Column("host", no_wrap=True), Column("heartbeat", no_wrap=True),
                      Column("free storage", justify="right", no_wrap=True),
                      Column("running tasks", justify="right"),
                      Column("VMs running/all", justify="right"),
                      Column("worker", no_wrap=True), Column("storage root", overflow="fold"))
    for row in rows:
        age = row["heartbeat_age_seconds"]
        table.add_row(row["host"], f"{age:.1f}s ago" if age is not None else "-",
                      format_bytes(row["storage_free_bytes"]), str(row["running_tasks"]),
                      f"{row['running_vms']}/{row['vms']}",
                      f"{row['machine']} pid {row['pid']}", str(row["storage_root"]))
    stdout_console().print(table if rows else "no live hosts (start one with 'vmtask worker')")


@main.command()
@click.option("--duration-ms", default=1000, show_default=True, type=int)
@click.option("--steps", default=10, show_default=True, type=int)
@no_wait_option
@json_option
@click.pass_context
def ping(ctx: click.Context, duration_ms: int, steps: int) -> None:
    """Run the diagnostic task on a host: it sleeps, reporting progress in steps."""
    state = state_of(ctx)
    run_task(state, state.server().ping(duration_ms=duration_ms, steps=steps))


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
    url = state_of(ctx).url
    if url:
        os.environ["VMTASK_REDIS_URL"] = url
    from workers import app  # settings are read from the environment at import

    app.worker_main(["worker", "--loglevel", loglevel, "-c", str(concurrency),
                     "-n", f"vmtask-{worker_host}@%h"])


@main.command()
@click.option("--workdir", default="./var/demo", show_default=True,
              type=click.Path(file_okay=False, path_type=Path))
@json_option
@click.pass_context
def demo(ctx: click.Context, workdir: Path) -> None:
    """Start Redis (unless VMTASK_REDIS_URL is set) and a worker, run operations, clean up."""
    from workers.devtools.demo import run_demo

    started = time.monotonic()
    run_demo(workdir.absolute(), console, follow)
    seconds = time.monotonic() - started
    if state_of(ctx).json:
        emit_json({"result": "Success", "seconds": round(seconds, 3)})
    console.print(f"[bold]demo finished in {seconds:.1f} s; nothing left running[/bold]")


if __name__ == "__main__":
    main()  # `python -m api.cli`: the name shown is still "vmtask" (see make_context)
