"""The ``hosts`` and ``ping`` verbs: live worker hosts, and the diagnostic task."""

from __future__ import annotations

import time
from typing import Any

import click
from rich.table import Column

from api import errors
from api.cli.evacuate import evacuate
from api.cli.follow import run_task
from api.cli.output import emit_json, format_bytes, new_table, stdout_console
from api.cli.state import json_option, no_wait_option, state_of
from api.enums import VMVMState
from api.protocol import keys
from api.protocol.records import STARTED
from api.server import VirtualServer
from api.store import broker_errors

# What `vmtask hosts` counts as a running VM, as the workers' heartbeat does.
RUNNING_VM_STATES = frozenset({VMVMState.Running, VMVMState.Paused})


def running_tasks_by_host(server: VirtualServer) -> dict[str, int]:
    """Started, unfinished tasks per host, from the set the workers keep."""
    with broker_errors(server.url):
        running = sorted(server.redis.smembers(keys.RUNNING_TASKS))
    counts: dict[str, int] = {}
    for snap in server.store.read_many(running) if running else []:
        if snap is not None and snap.state == STARTED:
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
            "maintenance": bool(beat.get("maintenance")),
            "status": beat,
        })
    return rows


@click.group(invoke_without_command=True)
@json_option
@click.pass_context
def hosts(ctx: click.Context) -> None:
    """Live worker hosts: heartbeat, free storage, running tasks and VMs, maintenance.

    With a verb: put a host in maintenance, or evacuate it."""
    if ctx.invoked_subcommand is not None:
        return
    state = state_of(ctx)
    rows = host_rows(state.server())
    if state.json:
        emit_json(rows)
        return
    table = new_table(Column("host", no_wrap=True), Column("heartbeat", no_wrap=True),
                      Column("free storage", justify="right", no_wrap=True),
                      Column("running tasks", justify="right"),
                      Column("VMs running/all", justify="right"),
                      Column("mode", no_wrap=True),
                      Column("worker", no_wrap=True), Column("storage root", overflow="fold"))
    for row in rows:
        age = row["heartbeat_age_seconds"]
        table.add_row(row["host"], f"{age:.1f}s ago" if age is not None else "-",
                      format_bytes(row["storage_free_bytes"]), str(row["running_tasks"]),
                      f"{row['running_vms']}/{row['vms']}",
                      "maintenance" if row["maintenance"] else "-",
                      f"{row['machine']} pid {row['pid']}", str(row["storage_root"]))
    stdout_console().print(table if rows else "no live hosts (start one with 'vmtask worker')")


@click.command()
@click.option("--duration-ms", default=1000, show_default=True, type=int)
@click.option("--steps", default=10, show_default=True, type=int)
@no_wait_option
@json_option
@click.pass_context
def ping(ctx: click.Context, duration_ms: int, steps: int) -> None:
    """Run the diagnostic task on a host: it sleeps, reporting progress in steps."""
    state = state_of(ctx)
    run_task(state, state.server().ping(duration_ms=duration_ms, steps=steps))



@hosts.command("maintenance")
@click.argument("host")
@click.argument("mode", type=click.Choice(["on", "off"]))
@json_option
@click.pass_context
def maintenance(ctx: click.Context, host: str, mode: str) -> None:
    """Put HOST in maintenance (nothing new is created, started or moved onto it) or
    take it out; it stays until switched off, across worker and Redis restarts."""
    state = state_of(ctx)
    state.server().set_maintenance(host, mode == "on")
    if state.json:
        emit_json({"host": host, "maintenance": mode == "on"})
    else:
        stdout_console().print(f"{host}: maintenance {mode}")


hosts.add_command(evacuate)
