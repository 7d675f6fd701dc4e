"""The ``disk`` verbs: virtual hard disks, by path relative to the host's storage root."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

import click

from api.cli.follow import run_task
from api.cli.output import emit_json, format_bytes, new_table, stdout_console
from api.cli.state import CliState, json_option, no_wait_option, state_of
from api.disks import HardDisk
from api.enums import VMHardDiskType
from api.protocol.records import TaskSnapshot
from api.server import VirtualServer
from api.task import VMTask

TYPE_CHOICES = {"dynamic": VMHardDiskType.Dynamic, "fixed": VMHardDiskType.FixedSize,
                "fixed-size": VMHardDiskType.FixedSize}


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


@click.group()
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


def run_on_disk(ctx: click.Context, path: str,
                operation: Callable[[HardDisk], VMTask]) -> NoReturn:
    """Start OPERATION on the disk at PATH and follow it as `run_disk_task` does."""
    state = state_of(ctx)
    run_disk_task(state, operation(state.server().get_hard_disk(path)))


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
    run_on_disk(ctx, path, lambda source: source.convert(destination, TYPE_CHOICES[disk_type]))


@disk.command("copy")
@click.argument("path")
@click.argument("destination_host", metavar="HOST")
@click.argument("destination", metavar="DEST")
@no_wait_option
@json_option
@click.pass_context
def disk_copy(ctx: click.Context, path: str, destination_host: str, destination: str) -> None:
    """Copy PATH to DEST in HOST's storage root (host to host over NBD; PATH is untouched)."""
    run_on_disk(ctx, path, lambda source: source.copy_to(destination_host, destination))


@disk.command("compact")
@click.argument("path")
@no_wait_option
@json_option
@click.pass_context
def disk_compact(ctx: click.Context, path: str) -> None:
    """Reclaim the unused space of PATH (rewritten, then swapped in atomically)."""
    run_on_disk(ctx, path, HardDisk.compact)


@disk.command("merge")
@click.argument("path")
@no_wait_option
@json_option
@click.pass_context
def disk_merge(ctx: click.Context, path: str) -> None:
    """Merge the differencing disk PATH into its parent (cannot be cancelled)."""
    run_on_disk(ctx, path, HardDisk.merge)


@disk.command("merge-to")
@click.argument("path")
@click.argument("destination")
@type_option(required=True)
@no_wait_option
@json_option
@click.pass_context
def disk_merge_to(ctx: click.Context, path: str, destination: str, disk_type: str) -> None:
    """Merge PATH and all its parents into a new DESTINATION disk."""
    run_on_disk(ctx, path, lambda source: source.merge_to(destination, TYPE_CHOICES[disk_type]))



@disk.command("list")
@json_option
@click.pass_context
def disk_list(ctx: click.Context) -> None:
    """Every disk image in the host's storage root (VM internals excluded)."""
    state = state_of(ctx)
    disks = state.server().hard_disks(state.host)
    if state.json:
        emit_json([disk_dict(d) for d in disks])
        return
    table = new_table("file", "type", "format", "size in guest", "size on host", "parent")
    for item in disks:
        table.add_row(item.file, item.type.name, item.format, format_bytes(item.size_in_guest),
                      format_bytes(item.size_on_host), item.parent.file if item.parent else "")
    stdout_console().print(table if disks else "no disks")


@disk.command("delete")
@click.argument("path")
@no_wait_option
@json_option
@click.pass_context
def disk_delete(ctx: click.Context, path: str) -> None:
    """Delete PATH (refused while a VM uses it or another disk is its child)."""
    state = state_of(ctx)
    task = state.server().get_hard_disk(path).delete()
    run_task(state, task, lambda _snap: {"deleted": path},
             lambda _snap: click.echo(f"Deleted {path}"))


@disk.command("resize")
@click.argument("path")
@click.option("--size-mb", type=int, required=True, help="The new, larger size in MB.")
@no_wait_option
@json_option
@click.pass_context
def disk_resize(ctx: click.Context, path: str, size_mb: int) -> None:
    """Grow PATH to --size-mb (qcow2 and raw images; never shrinks)."""
    run_on_disk(ctx, path, lambda source: source.resize(size_mb))
