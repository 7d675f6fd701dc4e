"""The README's demo: a private Redis and worker, real operations with live progress.

``vmtask demo`` runs it as ``python -m workers.devtools.demo --workdir DIR [--json]``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import click
from rich.console import Console

from api.cli.follow import follow as follow_task
from api.cli.main import reported_errors
from api.cli.output import console as cli_console
from api.cli.output import emit_json
from api.cli.state import CliState
from api.enums import VMHardDiskType, VMTaskResult
from api.protocol.records import TaskSnapshot
from api.server import VirtualServer
from api.task import VMTask
from workers.devtools.sandbox import RedisServer, WorkerProcess
from workers.devtools.tinyguest import build_tiny_guest

DEMO_HOST = "demo"
DEMO_DISK_MB = 512


def fill_disk(path: Path, size_mb: int) -> None:
    """Write a different pattern into each 8 MiB of the first half of the disk."""
    commands: list[str] = []
    for n in range(size_mb // 16):
        commands += ["-c", f"write -P {n % 250 + 1} {n * 8}M 8M"]
    subprocess.run(["qemu-io", "-f", "qcow2", *commands, str(path)], check=True,
                   capture_output=True)


def run_vm_demo(server: VirtualServer, storage: Path, console: Console,
                follow: Callable[[VMTask], TaskSnapshot]) -> None:
    """Boot a tiny Linux guest, save it, restore it, shut it down through its guest OS."""
    console.rule("building the tiny Linux guest (cached after the first run)")
    guest = build_tiny_guest()
    (storage / "guest").mkdir(parents=True, exist_ok=True)
    shutil.copy(guest.kernel, storage / "guest" / "vmlinuz")
    shutil.copy(guest.initrd, storage / "guest" / "initrd.gz")
    vm = server.create_virtual_machine(
        "demo-vm", memory_mb=256, disks=["demo/data.qcow2"], kernel="guest/vmlinuz",
        initrd="guest/initrd.gz", append=guest.append, guest_agent=True)
    console.print(f"created VM {vm.name} on host {vm.host}: {vm.state.name}")
    for title, start in [
        ("boot the VM", vm.startup),
        ("save it (RAM to a state file)", vm.save),
        ("restore it", vm.startup),
        ("shut it down through its guest OS (guest agent)", vm.guest_os.shutdown),
        ("delete it", vm.delete),
    ]:
        console.rule(title)
        snap = follow(start())
        colour = "green" if snap.result is VMTaskResult.Success else "red"
        state = vm.state.name if title != "delete it" else "gone"
        console.print(f"[{colour}]{snap.description}: "
                      f"{snap.result.name if snap.result is not None else '?'}[/{colour}]"
                      f" -> {state}", highlight=False)
    events = [e for e in server.vm_events("0", timeout_ms=100) if e.name == vm.name]
    console.print("state changes: " + " ".join(
        f"{e.old.name}->{e.new.name if e.new else 'gone'}" for e in events), highlight=False)


def run_demo(workdir: Path, console: Console,
             follow: Callable[[VMTask], TaskSnapshot]) -> None:
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    redis: RedisServer | None = None
    url = os.environ.get("VMTASK_REDIS_URL")
    if not url:
        redis = RedisServer(workdir / "redis").start()
        url = redis.url
        console.print(f"started a private redis-server on port {redis.port}")
    worker = WorkerProcess(url, DEMO_HOST, workdir / "storage", workdir, concurrency=2,
                           include=())
    try:
        worker.start()
        console.print(f"started a worker for host '{DEMO_HOST}' (log: {worker.log_path})")
        with VirtualServer(url, host=DEMO_HOST, poll_interval=0.5) as server:
            console.print(f"live hosts: {server.hosts}")
            storage = workdir / "storage"

            def fill() -> None:
                # Real data, so the conversions below have bytes to copy.
                fill_disk(storage / "demo/data.qcow2", DEMO_DISK_MB)
                console.print(f"wrote {DEMO_DISK_MB // 2} MiB of patterns with qemu-io")

            steps: list[tuple[str, Callable[[], VMTask | None]]] = [
                ("diagnostic ping, 2 s in 20 steps", lambda: server.ping(2000, 20)),
                ("create a dynamic qcow2 disk",
                 lambda: server.create_dynamic_virtual_hard_disk("demo/data.qcow2",
                                                                 DEMO_DISK_MB)),
                ("fill it with data (qemu-io on the host)", fill),
                ("convert it to a fixed-size VHD",
                 lambda: server.get_hard_disk("demo/data.qcow2").convert(
                     "demo/data-fixed.vhd", VMHardDiskType.FixedSize)),
                ("convert that back to a dynamic VHDX",
                 lambda: server.get_hard_disk("demo/data-fixed.vhd").convert(
                     "demo/data.vhdx", VMHardDiskType.Dynamic)),
                ("compact the qcow2",
                 lambda: server.get_hard_disk("demo/data.qcow2").compact()),
            ]
            for title, start in steps:
                console.rule(title)
                task = start()
                if task is None:
                    continue
                snap = follow(task)
                colour = "green" if snap.result is VMTaskResult.Success else "red"
                console.print(f"[{colour}]{snap.description}: "
                              f"{snap.result.name if snap.result is not None else '?'}"
                              f"[/{colour}]", highlight=False)
            for name in ("demo/data.qcow2", "demo/data-fixed.vhd", "demo/data.vhdx"):
                disk = server.get_hard_disk(name)
                console.print(f"{disk.file:24} {disk.type.name:10} "
                              f"guest {disk.size_in_guest >> 20} MiB, "
                              f"host {disk.size_on_host >> 20} MiB", highlight=False)
            run_vm_demo(server, storage, console, follow)
            console.rule("cancelling a running task")
            task = server.ping(60_000, 600)
            while task.percent_completed < 3:
                task.wait_for_completion(100)
            task.cancel()
            snap = follow(task)
            console.print(f"cancelled: result={snap.result.name if snap.result else None} "
                          f"error=0x{snap.error:08X}")
    finally:
        worker.stop()
        if redis is not None:
            redis.stop()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--workdir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Emptied, then holds the demo's Redis, storage and logs.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as one JSON document.")
def main(workdir: Path, as_json: bool) -> None:
    """Run the demo with the CLI's progress bars; errors and exit codes as ``vmtask``'s."""
    with reported_errors(CliState(json=as_json)):
        started = time.monotonic()
        run_demo(workdir.absolute(), cli_console, follow_task)
        seconds = time.monotonic() - started
        if as_json:
            emit_json({"result": "Success", "seconds": round(seconds, 3)})
        cli_console.print(f"[bold]demo finished in {seconds:.1f} s; nothing left running[/bold]")


if __name__ == "__main__":
    main()
