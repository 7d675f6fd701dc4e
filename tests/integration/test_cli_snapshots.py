"""``vmtask vm snapshot create|list|revert|delete`` and ``vmtask vm clone`` end to end:
real subprocesses, the session's ``alpha`` worker, real qemu-img."""

from __future__ import annotations

import re
from pathlib import Path

from tests.cli_runs import Cli
from tests.helpers import qemu_io

INVALID_STATE = "0x8007139F"


def test_snapshot_verbs_and_clone(cli: Cli, root: Path, vm_name: str) -> None:
    disk = f"{vm_name}/disk.qcow2"
    assert cli("disk", "create", disk, "--size-mb", "16").code == 0
    assert cli("vm", "create", vm_name, "--memory-mb", "64", "--disk", disk).code == 0
    qemu_io(root / disk, "qcow2", "write -P 0x11 0 1M")

    made = cli("vm", "snapshot", "create", vm_name, "s1")
    assert made.code == 0, made
    # The live progress bar on stderr, the outcome on stdout.
    assert re.search(rf"Taking snapshot s1 of VM {vm_name}.*100%", made.err), made
    assert f"VM {vm_name} has snapshot s1" in made.out
    second = cli("vm", "snapshot", "create", vm_name, "s2", "--json")
    assert second.code == 0, second
    assert [p["name"] for p in second.json()["snapshots"]] == ["s1", "s2"]

    listed = cli("vm", "snapshot", "list", vm_name, "--json")
    assert [(p["name"], p["parent"], p["state"], p["is_current"]) for p in listed.json()] == [
        ("s1", None, "TurnedOff", True), ("s2", "s1", "TurnedOff", True)]
    table = cli("vm", "snapshot", "list", vm_name)
    assert table.code == 0 and "s1" in table.out and "s2" in table.out, table
    shown = cli("vm", "show", vm_name, "--json")
    assert [p["name"] for p in shown.json()["snapshots"]] == ["s1", "s2"]
    assert "s2* (of s1)" in cli("vm", "show", vm_name).out

    reverted = cli("vm", "snapshot", "revert", vm_name, "s1", "--json")
    assert reverted.code == 0, reverted
    assert [p["is_current"] for p in reverted.json()["snapshots"]] == [True, False]

    clone = cli("vm", "clone", vm_name, f"{vm_name}-c", "--linked", "--snapshot", "s1",
                "--json")
    assert clone.code == 0, clone
    clone_disk = root / clone.json()["vm"]["disks"][0]
    qemu_io(clone_disk, "qcow2", "read -P 0x11 0 1M")
    refused = cli("vm", "snapshot", "delete", vm_name, "s1")
    assert refused.code == 2 and INVALID_STATE in refused.err, refused
    assert cli("vm", "delete", f"{vm_name}-c").code == 0
    elsewhere = cli("vm", "clone", vm_name, f"{vm_name}-d", "--linked", "--snapshot", "s1",
                    "--host", "beta")
    assert elsewhere.code == 2 and "linked clone stays" in elsewhere.err, elsewhere

    for point in ("s2", "s1"):
        gone = cli("vm", "snapshot", "delete", vm_name, point)
        assert gone.code == 0, gone
    assert cli("vm", "snapshot", "list", vm_name, "--json").json() == []
    qemu_io(root / disk, "qcow2", "read -P 0x11 0 1M")
    bad = cli("vm", "snapshot", "create", vm_name, "no/slash")
    assert bad.code == 2 and "0x80070057" in bad.err, bad
