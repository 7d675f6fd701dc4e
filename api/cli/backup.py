"""``vm backup`` and the ``backup`` verbs (list, restore, prune, verify).

Each operation verb follows its task with the live progress bar of every other
operation (`api.cli.follow.run_task`); ``list`` is a Redis read.  ``--host`` after
the verb names the repository's host (default: the VM's, or the global ``--host``).
"""

from __future__ import annotations

import base64
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from api.backups import Backup
from api.cli.follow import run_task
from api.cli.output import emit_json, format_bytes, format_time, new_table, stdout_console
from api.cli.state import json_option, no_wait_option, state_of
from api.cli.vm import find_vm, vm
from api.protocol.records import TaskSnapshot


def backup_dict(point: Backup) -> dict[str, Any]:
    return {**asdict(point), "disks": list(point.disks)}


@vm.command("backup")
@click.argument("name")
@click.argument("repository")
@click.option("--host", "repository_host", help="The repository's host (only the VM's, "
                                                "for now).")
@click.option("--full", is_flag=True, help="A full backup even when an incremental one "
                                           "is possible.")
@no_wait_option
@json_option
@click.pass_context
def vm_backup(ctx: click.Context, name: str, repository: str, repository_host: str | None,
              full: bool) -> None:
    """Back VM NAME up into REPOSITORY (a folder under the host's storage root)."""
    task = find_vm(state_of(ctx), name).backup(repository, host=repository_host, full=full)

    def show(snap: TaskSnapshot) -> None:
        out = snap.output or {}
        click.echo(f"Backup {out.get('id')} of VM {name}: {out.get('kind')} "
                   f"({out.get('reason')}); read {format_bytes(int(out.get('bytes_read', 0)))}, "
                   f"wrote {format_bytes(int(out.get('bytes_written', 0)))}")

    run_task(state_of(ctx), task, None, show)


@click.group("backup")
def backup() -> None:
    """Backup repositories: list, restore, prune and verify restore points."""


@backup.command("list")
@click.argument("repository")
@click.option("--host", "repository_host", help="The repository's host.")
@json_option
@click.pass_context
def backup_list(ctx: click.Context, repository: str, repository_host: str | None) -> None:
    """The restore points of REPOSITORY, oldest first."""
    state = state_of(ctx)
    points = state.server().backups(repository, host=repository_host)
    if state.json:
        emit_json([backup_dict(p) for p in points])
        return
    table = new_table("id", "vm", "created", "kind", "parent", "size on host")
    for p in points:
        table.add_row(p.id, p.vm, format_time(p.created), p.kind, p.parent or "-",
                      format_bytes(p.size_on_host))
    stdout_console().print(table if points else f"The repository {repository} is empty")


@backup.command("restore")
@click.argument("repository")
@click.argument("backup_id")
@click.argument("name")
@click.option("--host", "repository_host", help="The repository's host (the new VM's too).")
@no_wait_option
@json_option
@click.pass_context
def backup_restore(ctx: click.Context, repository: str, backup_id: str, name: str,
                   repository_host: str | None) -> None:
    """Restore BACKUP_ID of REPOSITORY as a new turned-off VM NAME."""
    state = state_of(ctx)
    task = state.server().restore_backup(repository, backup_id, name,
                                         repository_host=repository_host)

    def show(_snap: TaskSnapshot) -> None:
        click.echo(f"VM {name} holds backup {backup_id}")

    run_task(state, task, None, show)


@backup.command("prune")
@click.argument("repository")
@click.option("--keep", "keep_last", type=int, required=True,
              help="Restore points to keep per VM (the newest).")
@click.option("--host", "repository_host", help="The repository's host.")
@no_wait_option
@json_option
@click.pass_context
def backup_prune(ctx: click.Context, repository: str, keep_last: int,
                 repository_host: str | None) -> None:
    """Keep the newest --keep restore points of each VM in REPOSITORY."""
    state = state_of(ctx)
    task = state.server().prune_backups(repository, keep_last, host=repository_host)

    def show(snap: TaskSnapshot) -> None:
        removed = (snap.output or {}).get("removed", [])
        click.echo(f"Removed {len(removed)} restore points: {', '.join(removed) or 'none'}")

    run_task(state, task, None, show)


@backup.command("verify")
@click.argument("repository")
@click.argument("backup_id")
@click.option("--host", "repository_host", help="The repository's host.")
@click.option("--screenshot", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the scratch VM's screenshot (PNG) here.")
@no_wait_option
@json_option
@click.pass_context
def backup_verify(ctx: click.Context, repository: str, backup_id: str,
                  repository_host: str | None, screenshot: Path | None) -> None:
    """Boot BACKUP_ID of REPOSITORY in a scratch VM without network, then remove it."""
    state = state_of(ctx)
    task = state.server().verify_backup(repository, backup_id, host=repository_host)

    def save(snap: TaskSnapshot) -> dict[str, Any]:
        png = (snap.output or {}).get("screenshot_png_base64")
        if screenshot is not None and png:
            screenshot.write_bytes(base64.b64decode(png))
        return {}

    def show(snap: TaskSnapshot) -> None:
        out = snap.output or {}
        agent = "its guest agent answered" if out.get("guest_agent") else "no guest agent"
        click.echo(f"Backup {backup_id} boots: {agent} after {out.get('ran_s')} s")

    run_task(state, task, save, show)
