"""The files of a VM's snapshots as the tests look at them: the tree, the present
overlay, a snapshot's layer, and bytes written and read in them with qemu-io."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from api import VirtualMachine, VirtualServer
from tests.helpers import assert_succeeded as ok
from tests.helpers import qemu_io
from workers.devtools.sandbox import free_port


def new_vm(server: VirtualServer, name: str, size_mb: int = 16) -> VirtualMachine:
    ok(server.create_dynamic_virtual_hard_disk(f"{name}/disk.qcow2", size_mb))
    return server.create_virtual_machine(name, memory_mb=64, disks=[f"{name}/disk.qcow2"],
                                         # A free port: a fixed one clashed with
                                         # another test's listener on the full suite.
                                         port_forwards={free_port(): 22})


def tree(root: Path, name: str) -> dict[str, object] | None:
    path = root / "vms" / name / "snapshots" / "tree.json"
    return json.loads(path.read_text()) if path.exists() else None


def present(root: Path, name: str) -> Path:
    """The image the VM runs on now: its present overlay, or its base disk."""
    data = tree(root, name)
    if data is None or data["present"] is None:
        return root / name / "disk.qcow2"
    return root / "vms" / name / "snapshots" / f"{data['present']}-0.qcow2"


def layer(root: Path, name: str, snapshot: str) -> Path:
    data = tree(root, name)
    assert data is not None
    point = next(p for p in data["snapshots"] if p["name"] == snapshot)  # type: ignore[attr-defined]
    return root / "vms" / name / "snapshots" / f"{point['layer']}-0.qcow2"


def write(image: Path, pattern: int, offset: str = "0", length: str = "1M") -> None:
    qemu_io(image, "qcow2", f"write -P {pattern:#x} {offset} {length}")


def reads(image: Path, pattern: int, offset: str = "0", length: str = "1M") -> None:
    qemu_io(image, "qcow2", f"read -P {pattern:#x} {offset} {length}")


def export(image: Path, out: Path) -> Path:
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(out)], check=True)
    return out


def layer_files(root: Path, name: str) -> set[str]:
    folder = root / "vms" / name / "snapshots"
    return {p.name for p in folder.glob("*.qcow2")} if folder.exists() else set()
