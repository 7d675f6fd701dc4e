"""What the network-namespace tests (`tests.netns`) share: worker settings that show a
loss within seconds, a host's storage root and a client, the tiny guest on host a, the
transfer offer a source announces, and what a VM leaves behind on a host."""

from __future__ import annotations

import shutil
from pathlib import Path

from api import VirtualMachine, VirtualServer
from api.protocol import keys
from tests.guests import wait_for_agent, where
from tests.helpers import assert_succeeded as done
from tests.helpers import pids_of, qemu_io
from tests.netns import Network
from workers.devtools.sandbox import wait_until
from workers.devtools.tinyguest import build_tiny_guest

__all__ = ["FAST", "LEASE", "STALL", "connect", "files_under", "install_guest", "nothing_of",
           "offer_of", "root", "running_guest", "where"]

LEASE = 6.0
STALL = 5.0
# Worker settings: a short heartbeat, lease and stall bound, so losses show within seconds.
FAST = {"VMTASK_HEARTBEAT_SECONDS": "2", "VMTASK_LEASE_SECONDS": str(int(LEASE)),
        "VMTASK_TRANSFER_STALL_SECONDS": str(int(STALL))}


def root(net: Network, name: str) -> Path:
    """The storage root of the host's worker (made if the worker has not yet)."""
    worker = net.hosts[name].worker
    assert worker is not None
    worker.storage_root.mkdir(parents=True, exist_ok=True)
    return worker.storage_root


def files_under(path: Path) -> list[str]:
    """The files of a storage root, without its lock files."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")
                  if not p.is_dir() and ".vmtask-locks" not in p.parts)


def offer_of(server: VirtualServer) -> dict[str, str]:
    def found() -> dict[str, str] | None:
        for key in server.redis.keys(keys.transfer("*")):
            offer = server.redis.hgetall(key)
            if "port" in offer:
                return dict(offer)
        return None

    return dict(wait_until(found, 60, "the source to announce its export"))


def install_guest(net: Network) -> None:
    """The tiny guest's kernel and initrd in both roots (a VM names them by path)."""
    guest = build_tiny_guest()
    for host in ("a", "b"):
        (root(net, host) / "guest").mkdir(parents=True, exist_ok=True)
        shutil.copy(guest.kernel, root(net, host) / "guest" / "vmlinuz")
        shutil.copy(guest.initrd, root(net, host) / "guest" / "initrd.gz")


def connect(net: Network) -> VirtualServer:
    """A client of the network's Redis, as host a."""
    assert net.redis is not None
    return VirtualServer(net.redis.url, host="a", poll_interval=0.2)


def running_guest(server: VirtualServer, net: Network, name: str, *, data_mb: int,
                  undoable: bool = False) -> VirtualMachine:
    """A started tiny guest on host a, its agent answering, ``data_mb`` written at 1M."""
    done(server.create_dynamic_virtual_hard_disk(f"{name}/d.qcow2", 64, host="a"))
    qemu_io(root(net, "a") / name / "d.qcow2", "qcow2", f"write -P 0x5a 1M {data_mb}M")
    vm = server.create_virtual_machine(
        name, memory_mb=128, disks=[f"{name}/d.qcow2"], guest_agent=True, network=None,
        undoable=undoable, host="a", kernel="guest/vmlinuz", initrd="guest/initrd.gz",
        append="console=ttyS0 quiet panic=-1")
    done(vm.startup())
    wait_for_agent(root(net, "a"), name)
    return vm


def nothing_of(net: Network, host: str, name: str) -> list[str]:
    """Whatever of VM ``name`` is on the host: files, temporaries, QEMU processes."""
    here = root(net, host)
    left = [str(p.relative_to(here)) for p in here.rglob("*")
            if not p.is_dir() and ".vmtask-locks" not in p.parts
            and p.parts[len(here.parts)] != "guest"]
    left += [f"pid {p}" for p in pids_of(f"{here}/vms/{name}/")]
    return left
