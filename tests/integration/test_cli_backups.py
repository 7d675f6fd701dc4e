"""``vmtask vm backup`` and ``vmtask backup list|restore|prune`` end to end: real
subprocesses, the session's ``alpha`` worker, real qemu-img and qemu-storage-daemon."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from api import VirtualServer
from tests.cli_runs import Cli
from tests.helpers import assert_succeeded as ok
from tests.helpers import qemu_io

ACCESS_DENIED = "0x80070005"


def test_backup_verbs(cli: Cli, root: Path, vm_name: str, server: VirtualServer) -> None:
    disk = f"{vm_name}/disk.qcow2"
    repository = f"repo-{vm_name}"
    ok(server.create_dynamic_virtual_hard_disk(disk, 16))
    server.create_virtual_machine(vm_name, memory_mb=64, disks=[disk])
    qemu_io(root / disk, "qcow2", "write -P 0x11 0 1M")

    first = cli("vm", "backup", vm_name, repository)
    assert first.code == 0, first
    # The live progress bar on stderr, the outcome on stdout.
    assert re.search(rf"Backing up VM {vm_name}.*100%", first.err), first
    assert "full (the first backup of this VM in the repository)" in first.out, first
    qemu_io(root / disk, "qcow2", "write -P 0x22 0 64k")
    second = cli("vm", "backup", vm_name, repository, "--json")
    assert second.code == 0, second
    output = second.json()["output"]
    assert (output["kind"], output["bytes_read"]) == ("incremental", 65536)

    listed = cli("backup", "list", repository, "--json").json()
    assert [(b["kind"], b["vm"]) for b in listed] == [("full", vm_name),
                                                      ("incremental", vm_name)]

    restored = cli("backup", "restore", repository, output["id"], f"{vm_name}-r")
    assert restored.code == 0, restored
    made = server.find_virtual_machine(f"{vm_name}-r")
    assert made is not None
    compare = subprocess.run(["qemu-img", "compare", str(root / made.disks[0]),
                              str(root / disk)], capture_output=True, text=True)
    assert compare.returncode == 0, compare.stdout + compare.stderr

    pruned = cli("backup", "prune", repository, "--keep", "1")
    assert pruned.code == 0 and f"Removed 1 restore points: {listed[0]['id']}" in pruned.out
    table = cli("backup", "list", repository)
    assert output["id"] in table.out and listed[0]["id"] not in table.out, table

    outside = cli("vm", "backup", vm_name, "../elsewhere")
    assert outside.code != 0 and ACCESS_DENIED in outside.err, outside
