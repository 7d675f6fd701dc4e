"""The tiny guest on real workers, as the live-migration tests drive it: its files on a
host, its agent (boot id, synced writes), a running guest on a given host, and what a VM
leaves behind on a host."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

from api import VirtualMachine, VirtualServer, VMVMState
from tests.helpers import assert_succeeded as done
from tests.helpers import pids_of, qemu_io
from workers.devtools.sandbox import WorkerProcess, wait_until
from workers.devtools.tinyguest import build_tiny_guest
from workers.engines.guest_agent import GuestAgentClient
from workers.failures import OperationFailed

S = VMVMState
BLOCK = 4096
# Workers that beat every second, so a lost host is seen quickly.
FAST = {"VMTASK_HEARTBEAT_SECONDS": "1"}


def add_guest(root: Path) -> None:
    """The tiny guest's kernel and initrd under the host's guest/ folder."""
    guest = build_tiny_guest()
    (root / "guest").mkdir(parents=True, exist_ok=True)
    shutil.copy(guest.kernel, root / "guest" / "vmlinuz")
    shutil.copy(guest.initrd, root / "guest" / "initrd.gz")


def stop_all(*workers: WorkerProcess) -> None:
    """Stop the workers and SIGKILL any QEMU they left running."""
    for worker in workers:
        worker.stop()
        for pid in pids_of(f"{worker.storage_root}/vms"):
            os.kill(pid, 9)


def agent(root: Path, vm: str) -> GuestAgentClient:
    return GuestAgentClient(root / "vms" / vm / "qga.sock")


def wait_for_agent(root: Path, vm: str, timeout: float = 90) -> None:
    def answers() -> bool:
        with agent(root, vm) as client:
            try:
                return client.ping(timeout=2)
            except OperationFailed:
                return False
    wait_until(answers, timeout, f"the guest agent of {vm}", interval=0.5)


def boot_id(root: Path, vm: str) -> str:
    with agent(root, vm) as client:
        handle = client.execute("guest-file-open", {"path": "/proc/sys/kernel/random/boot_id"})
        read = client.execute("guest-file-read", {"handle": handle})
        client.execute("guest-file-close", {"handle": handle})
    return base64.b64decode(read["buf-b64"]).decode().strip()


def guest_write(client: GuestAgentClient, value: int) -> None:
    """The guest writes ``value`` over the first block of its disk, synced.

    qemu-ga's guest-file-write leaves the data in the guest's page cache: only an
    fsync in the guest puts it on the virtual disk (FACTS), so a dd with
    conv=fsync rewrites the block from that cache and flushes the device, and
    returns (guest-exec-status says it exited) only once it is there."""
    handle = client.execute("guest-file-open", {"path": "/dev/vda", "mode": "r+"})
    client.execute("guest-file-write", {"handle": handle,
                                        "buf-b64": base64.b64encode(bytes([value]) * BLOCK)
                                        .decode()}, timeout=10)
    client.execute("guest-file-close", {"handle": handle})
    synced = client.run(["/bin/dd", "if=/dev/vda", "of=/dev/vda", f"bs={BLOCK}", "count=1",
                         "conv=notrunc,fsync"], timeout=30)
    assert synced.exit_code == 0, synced


def running_guest(server: VirtualServer, hosts: dict[str, WorkerProcess], name: str,
                  host: str, *, disk_mb: int = 64, data_mb: int = 8) -> VirtualMachine:
    root = hosts[host].storage_root
    done(server.create_dynamic_virtual_hard_disk(f"{name}/d.qcow2", disk_mb, host=host))
    qemu_io(root / name / "d.qcow2", "qcow2", f"write -P 0x5a 1M {data_mb}M")
    vm = server.create_virtual_machine(
        name, memory_mb=128, disks=[f"{name}/d.qcow2"], guest_agent=True, network=None,
        host=host, kernel="guest/vmlinuz", initrd="guest/initrd.gz",
        append="console=ttyS0 quiet panic=-1")
    done(vm.startup())
    wait_for_agent(root, name)
    return vm


def where(vm: VirtualMachine) -> tuple[str, S]:
    state = vm.state  # reads the record, and with it the VM's host
    return vm.host, state


def nothing_of(worker: WorkerProcess, name: str) -> list[str]:
    """Whatever of VM ``name`` is on the host: files, temporaries, QEMU processes."""
    root = worker.storage_root
    left = [str(p.relative_to(root)) for p in (root / name).glob("*")] if (
        root / name).exists() else []
    left += [str(p.relative_to(root)) for p in root.rglob("*.vmtask-*.tmp")]
    if (root / "vms" / name).exists():
        left.append(f"vms/{name}")
    left += [f"pid {p}" for p in pids_of(f"{root}/vms/{name}/")]
    return left
