"""The ``vm`` verbs: virtual machines, QEMU processes on a worker host.

The lifecycle verbs (start, save, ... delete) are built from one table, `VM_ACTIONS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import click
from rich.table import Table

from api import errors
from api.cli.follow import run_task
from api.cli.output import emit_json, format_duration, new_table, stdout_console
from api.cli.state import CliState, json_option, no_wait_option, state_of
from api.protocol.records import TaskSnapshot
from api.task import VMTask
from api.vms import VirtualMachine


def vm_dict(vm: VirtualMachine) -> dict[str, Any]:
    details = vm.details
    state = details["state"]
    return {
        **details,
        "state": state.name,
        "state_code": int(state),
        "port_forwards": {str(h): g for h, g in details["port_forwards"].items()},
    }


def parse_forwards(values: tuple[str, ...]) -> dict[int, int] | None:
    """``HOST:GUEST`` TCP port pairs; None when none were given."""
    if not values:
        return None
    forwards: dict[int, int] = {}
    for value in values:
        host_port, sep, guest_port = value.partition(":")
        if not sep or not host_port.isdigit() or not guest_port.isdigit():
            raise click.BadParameter(f"{value!r} is not HOST:GUEST (two TCP ports)",
                                     param_hint="--forward")
        forwards[int(host_port)] = int(guest_port)
    return forwards


def network_value(value: str) -> str | None:
    return None if value == "none" else value


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
                       ("pid", "pid"), ("uptime", "uptime_s"), ("cpus", "cpus"),
                       ("memory", "memory_mb"), ("network", "network"), ("mac", "mac"),
                       ("console (VNC)", "vnc"), ("undoable", "undoable"),
                       ("guest agent", "guest_agent")):
        value = info[key]
        if key == "memory_mb":
            value = f"{value} MB"
        elif key == "uptime_s" and value is not None:
            value = format_duration(value)
        elif isinstance(value, bool):
            value = "yes" if value else "no"
        grid.add_row(label, "-" if value is None else str(value))
    grid.add_row("disks", ", ".join(info["disks"]) or "-")
    grid.add_row("port forwards", ", ".join(
        f"{h} -> {g}" for h, g in info["port_forwards"].items()) or "-")
    if "snapshots" in info:  # '*': the present descends from it
        grid.add_row("snapshots", ", ".join(
            f"{p['name']}{'*' if p['is_current'] else ''}"
            + (f" (of {p['parent']})" if p["parent"] else "")
            for p in info["snapshots"]) or "-")
    stdout_console().print(grid)


@click.group()
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
@click.option("--cpus", type=int, default=1, show_default=True, help="Virtual CPUs.")
@click.option("--network", default="user", show_default=True, metavar="user|none|bridge:NAME",
              help="user: QEMU's NAT; bridge:NAME: a tap on an existing host bridge.")
@click.option("--forward", "forwards", multiple=True, metavar="HOST:GUEST",
              help="Forward a host TCP port to a guest port (user network); repeatable.")
@json_option
@click.pass_context
def vm_create(ctx: click.Context, name: str, memory_mb: int, disks: tuple[str, ...],
              undoable: bool, kernel: str | None, initrd: str | None, append: str | None,
              guest_agent: bool, cpus: int, network: str, forwards: tuple[str, ...]) -> None:
    """Register a new VM, turned off, on the target host."""
    state = state_of(ctx)
    created = state.server().create_virtual_machine(
        name, memory_mb, disks, undoable, host=state.host, kernel=kernel, initrd=initrd,
        append=append, guest_agent=guest_agent, cpus=cpus, network=network_value(network),
        port_forwards=parse_forwards(forwards))
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
    table = new_table("name", "host", "state", "cpus", "memory", "network", "disks", "undoable")
    for info in infos:
        table.add_row(info["name"], info["host"], info["state"], str(info["cpus"]),
                      f"{info['memory_mb']} MB", info["network"] or "-",
                      ", ".join(info["disks"]) or "-", "yes" if info["undoable"] else "no")
    stdout_console().print(table if infos else "no VMs")


@vm.command("show")
@click.argument("name")
@json_option
@click.pass_context
def vm_show(ctx: click.Context, name: str) -> None:
    """Configuration and live state of VM NAME: process, uptime, console, network."""
    state = state_of(ctx)
    machine = find_vm(state, name)
    info = vm_dict(machine)
    info["snapshots"] = [{**asdict(p), "state": p.state.name} for p in machine.snapshots]
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



@vm.command("migrate")
@click.argument("name")
@click.argument("destination_host")
@no_wait_option
@json_option
@click.pass_context
def vm_migrate(ctx: click.Context, name: str, destination_host: str) -> None:
    """Move VM NAME, with its disks, to DESTINATION_HOST: cold when it is turned off or
    saved, live (it keeps running) when it runs or is paused."""
    state = state_of(ctx)
    task = find_vm(state, name).migrate(destination_host)

    def extra(_snap: TaskSnapshot) -> dict[str, Any]:
        after = state.server().find_virtual_machine(name)
        return {"vm": vm_dict(after) if after is not None else None}

    def show(_snap: TaskSnapshot) -> None:
        after = state.server().find_virtual_machine(name)
        click.echo(f"VM {name} is on {after.host if after is not None else 'no host'}")

    run_task(state, task, extra, show)
