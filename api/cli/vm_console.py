"""The ``vm`` verbs that edit a VM or read what it shows: configure, screenshot,
console (VNC address and password) and log (the serial console)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from api.cli.output import emit_json, stdout_console
from api.cli.state import json_option, state_of
from api.cli.vm import find_vm, network_value, parse_forwards, print_vm, vm, vm_dict

FOLLOW_INTERVAL_S = 1.0
FOLLOW_TAIL_BYTES = 1024 * 1024


@vm.command("configure")
@click.argument("name")
@click.option("--memory-mb", type=int)
@click.option("--cpus", type=int)
@click.option("--disk", "disks", multiple=True,
              help="The new disk list, in order (replaces the old one); repeatable.")
@click.option("--no-disks", is_flag=True, help="Detach every disk.")
@click.option("--network", metavar="user|none|bridge:NAME")
@click.option("--forward", "forwards", multiple=True, metavar="HOST:GUEST",
              help="The new port forwards (replace the old ones); repeatable.")
@click.option("--no-forwards", is_flag=True, help="Drop every port forward.")
@json_option
@click.pass_context
def vm_configure(ctx: click.Context, name: str, memory_mb: int | None, cpus: int | None,
                 disks: tuple[str, ...], no_disks: bool, network: str | None,
                 forwards: tuple[str, ...], no_forwards: bool) -> None:
    """Change what VM NAME gets at its next boot (only while it is turned off)."""
    if no_disks and disks:
        raise click.UsageError("--disk and --no-disks exclude each other", ctx)
    if no_forwards and forwards:
        raise click.UsageError("--forward and --no-forwards exclude each other", ctx)
    state = state_of(ctx)
    machine = find_vm(state, name)
    machine.configure(
        memory_mb=memory_mb, cpus=cpus,
        disks=[] if no_disks else (list(disks) if disks else None),
        network=None if network is None else (network_value(network) or "none"),
        port_forwards={} if no_forwards else parse_forwards(forwards))
    info = vm_dict(machine)
    if state.json:
        emit_json(info)
    else:
        print_vm(info)


@vm.command("screenshot")
@click.argument("name")
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path))
@json_option
@click.pass_context
def vm_screenshot(ctx: click.Context, name: str, output: Path) -> None:
    """Save a PNG of VM NAME's display to OUTPUT (running or paused)."""
    state = state_of(ctx)
    png = find_vm(state, name).screenshot()
    output.write_bytes(png)
    if state.json:
        emit_json({"name": name, "file": str(output), "bytes": len(png)})
    else:
        click.echo(f"Saved a screenshot of {name} to {output} ({len(png)} bytes)")


@vm.command("console")
@click.argument("name")
@json_option
@click.pass_context
def vm_console(ctx: click.Context, name: str) -> None:
    """The VNC address and this start's password of VM NAME."""
    state = state_of(ctx)
    access = find_vm(state, name).console_access()
    if state.json:
        emit_json({"name": name, **(access or {"address": None, "password": None})})
    elif access is None:
        click.echo(f"VM {name} has no console now (it is not running)")
    else:
        click.echo(f"VNC {access['address']}  password {access['password']}")


@vm.command("log")
@click.argument("name")
@click.option("--tail-bytes", type=click.IntRange(1, 4 * 1024 * 1024), default=65536,
              show_default=True)
@click.option("-f", "--follow", is_flag=True, help="Keep printing what the guest writes.")
@json_option
@click.pass_context
def vm_log(ctx: click.Context, name: str, tail_bytes: int, follow: bool) -> None:
    """The serial console output of VM NAME, read on its host."""
    state = state_of(ctx)
    machine = find_vm(state, name)
    text = machine.console_log(tail_bytes)
    if state.json:
        emit_json({"name": name, "text": text})
        return
    out = stdout_console()
    out.print(text, end="", markup=False, highlight=False)
    # Each read is a quick task: follow by re-reading the tail and printing what
    # is new after the last text seen (a rotation in between may drop a little).
    seen = machine.console_log(FOLLOW_TAIL_BYTES) if follow else ""
    while follow:
        time.sleep(FOLLOW_INTERVAL_S)
        now = machine.console_log(FOLLOW_TAIL_BYTES)
        anchor = seen[-4096:]
        at = now.rfind(anchor) if anchor else -1
        fresh = now[at + len(anchor):] if at >= 0 else now
        if fresh:
            out.print(fresh, end="", markup=False, highlight=False)
        seen = now
