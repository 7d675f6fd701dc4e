"""The ``vm snapshot`` verbs (create, list, revert, delete) and ``vm clone``.

Each operation verb follows its task with the live progress bar of every other
operation (`api.cli.follow.run_task`); ``list`` is a Redis read.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import click

from api.cli.follow import run_task
from api.cli.output import emit_json, format_bytes, format_time, new_table, stdout_console
from api.cli.state import json_option, no_wait_option, state_of
from api.cli.vm import find_vm, vm, vm_dict
from api.protocol.records import TaskSnapshot
from api.snapshots import Snapshot


def snapshot_dict(point: Snapshot) -> dict[str, Any]:
    return {**asdict(point), "state": point.state.name}


@vm.group("snapshot")
def snapshot() -> None:
    """Snapshots of a VM: a tree of named points, taken in any stable state (live when it runs)."""


def _follow_tree(ctx: click.Context, name: str, task: Any, done: str) -> None:
    state = state_of(ctx)

    def extra(_snap: TaskSnapshot) -> dict[str, Any]:
        machine = state.server().find_virtual_machine(name)
        points = [snapshot_dict(p) for p in machine.snapshots] if machine else []
        return {"snapshots": points}

    def show(_snap: TaskSnapshot) -> None:
        click.echo(done)

    run_task(state, task, extra, show)


@snapshot.command("create")
@click.argument("name")
@click.argument("snapshot_name")
@click.option("--no-memory", is_flag=True,
              help="Disks only (a running guest's file systems frozen through its agent).")
@no_wait_option
@json_option
@click.pass_context
def snapshot_create(ctx: click.Context, name: str, snapshot_name: str, no_memory: bool) -> None:
    """Take snapshot SNAPSHOT_NAME of VM NAME."""
    task = find_vm(state_of(ctx), name).create_snapshot(snapshot_name,
                                                        include_memory=not no_memory)
    _follow_tree(ctx, name, task, f"VM {name} has snapshot {snapshot_name}")


@snapshot.command("list")
@click.argument("name")
@json_option
@click.pass_context
def snapshot_list(ctx: click.Context, name: str) -> None:
    """The snapshots of VM NAME in creation order; * marks those the present descends from."""
    state = state_of(ctx)
    points = find_vm(state, name).snapshots
    if state.json:
        emit_json([snapshot_dict(p) for p in points])
        return
    table = new_table("", "name", "parent", "created", "state", "memory", "size on host")
    for p in points:
        table.add_row("*" if p.is_current else "", p.name, p.parent or "-",
                      format_time(p.created), p.state.name, "yes" if p.include_memory else "no",
                      format_bytes(p.size_on_host))
    stdout_console().print(table if points else f"VM {name} has no snapshots")


@snapshot.command("revert")
@click.argument("name")
@click.argument("snapshot_name")
@no_wait_option
@json_option
@click.pass_context
def snapshot_revert(ctx: click.Context, name: str, snapshot_name: str) -> None:
    """Revert VM NAME to SNAPSHOT_NAME: what changed since is discarded."""
    task = find_vm(state_of(ctx), name).revert_to_snapshot(snapshot_name)
    _follow_tree(ctx, name, task, f"VM {name} is at snapshot {snapshot_name}")


@snapshot.command("delete")
@click.argument("name")
@click.argument("snapshot_name")
@no_wait_option
@json_option
@click.pass_context
def snapshot_delete(ctx: click.Context, name: str, snapshot_name: str) -> None:
    """Delete SNAPSHOT_NAME of VM NAME; the present and the other snapshots keep their bytes."""
    task = find_vm(state_of(ctx), name).delete_snapshot(snapshot_name)
    _follow_tree(ctx, name, task, f"Snapshot {snapshot_name} of VM {name} is deleted")


@vm.command("clone")
@click.argument("name")
@click.argument("clone_name")
@click.option("--linked", is_flag=True,
              help="qcow2 overlays over the snapshot's layers (needs --snapshot).")
@click.option("--snapshot", "snapshot_name", help="Clone the VM as it was at this snapshot.")
@click.option("--host", "target_host",
              help="The clone's host (default the source's); a full clone only.")
@no_wait_option
@json_option
@click.pass_context
def vm_clone(ctx: click.Context, name: str, clone_name: str, linked: bool,
             snapshot_name: str | None, target_host: str | None) -> None:
    """Clone VM NAME into a new turned-off VM CLONE_NAME (own MAC, no port forwards)."""
    state = state_of(ctx)
    task = find_vm(state, name).clone(clone_name, linked=linked, snapshot=snapshot_name,
                                      host=target_host)

    def extra(_snap: TaskSnapshot) -> dict[str, Any]:
        made = state.server().find_virtual_machine(clone_name)
        return {"vm": vm_dict(made) if made is not None else None}

    def show(_snap: TaskSnapshot) -> None:
        where = f" on {made.host}" if (made := state.server().find_virtual_machine(
            clone_name)) is not None else ""
        click.echo(f"Cloned VM {name} into {clone_name}{where}")

    run_task(state, task, extra, show)
