"""Backups (issue 24): full then incremental through QEMU's backup job, a repository
readable without vmtask, restore, prune; real qemu-img, qemu-storage-daemon, workers
and Redis.  Bytes are written with qemu-io while the VM is off, each restore point is
checked with ``qemu-img compare`` against a raw export taken at backup time, and the
dirty bitmaps are read from the images' headers (``qemu-img info``)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from api import VirtualMachine, VirtualServer, errors
from api.exporter import families, read
from tests.helpers import assert_succeeded as ok
from tests.helpers import bitmaps, qemu_io, same

CLUSTER = 65536


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    return "bk-" + request.node.name.replace("test_", "")[:24].strip("_")


def new_vm(server: VirtualServer, name: str, size_mb: int = 32) -> VirtualMachine:
    ok(server.create_dynamic_virtual_hard_disk(f"{name}/disk.qcow2", size_mb))
    return server.create_virtual_machine(name, memory_mb=64, disks=[f"{name}/disk.qcow2"],
                                         network=None)


def write(image: Path, pattern: int, offset: str = "0", length: str = "1M") -> None:
    qemu_io(image, "qcow2", f"write -P {pattern:#x} {offset} {length}")


def export(image: Path, out: Path) -> Path:
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(out)], check=True)
    return out


def index(root: Path, repository: str) -> dict[str, object]:
    data: dict[str, object] = json.loads((root / repository / "index.json").read_text())
    return data


def backup(vm: VirtualMachine, repository: str, full: bool = False) -> dict[str, object]:
    task = vm.backup(repository, full=full)
    ok(task)
    output: dict[str, object] = task.snapshot().output
    return output


def test_full_then_incremental_restore_and_prune(server: VirtualServer, root: Path,
                                                  name: str, tmp_path: Path) -> None:
    vm = new_vm(server, name)
    disk = root / name / "disk.qcow2"
    repository = f"backups-{name}"
    write(disk, 0x11, "0", "4M")
    first = backup(vm, repository)
    assert (first["kind"], first["parent"], first["vm"]) == ("full", None, name)
    assert first["disks"] == [f"{name}/disk.qcow2"]
    raw1 = export(disk, tmp_path / "at1.raw")
    # The VM's bitmap counts from this backup, and it is the only one of this repository.
    repo_id = str(index(root, repository)["id"])
    assert list(bitmaps(disk)) == [f"vmtask-backup-{repo_id[:12]}-{first['id']}"]

    write(disk, 0x22, "1M", "64k")
    second = backup(vm, repository)
    assert (second["kind"], second["parent"]) == ("incremental", first["id"])
    assert second["bytes_read"] == CLUSTER  # one dirty cluster, nothing else
    raw2 = export(disk, tmp_path / "at2.raw")
    assert list(bitmaps(disk)) == [f"vmtask-backup-{repo_id[:12]}-{second['id']}"]

    write(disk, 0x33, "8M", "128k")
    third = backup(vm, repository)
    assert (third["kind"], third["parent"], third["bytes_read"]) == (
        "incremental", second["id"], 2 * CLUSTER)
    raw3 = export(disk, tmp_path / "at3.raw")

    # The repository reads without vmtask: each backup's image chain is its disk then.
    folder = root / repository
    for output, raw in ((first, raw1), (second, raw2), (third, raw3)):
        assert same(folder / str(output["id"]) / "disk-0.qcow2", raw), output["id"]
    assert [(b.id, b.kind, b.parent) for b in server.backups(repository)] == [
        (first["id"], "full", None), (second["id"], "incremental", first["id"]),
        (third["id"], "incremental", second["id"])]

    restore = server.restore_backup(repository, str(second["id"]), f"{name}-r")
    ok(restore)
    restored = server.find_virtual_machine(f"{name}-r")
    assert restored is not None and restored.memory_mb == 64 and restored.network is None
    assert same(root / restored.disks[0], raw2)

    prune = server.prune_backups(repository, 1)
    ok(prune)
    assert prune.snapshot().output["removed"] == [first["id"], second["id"]]
    assert [(b.id, b.kind, b.parent) for b in server.backups(repository)] == [
        (third["id"], "full", None)]
    assert same(folder / str(third["id"]) / "disk-0.qcow2", raw3)
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        str(third["id"]), "index.json"]
    # Pruning never touches the newest backup's bitmap: the next is still incremental.
    write(disk, 0x44, "2M", "64k")
    fourth = backup(vm, repository)
    assert (fourth["kind"], fourth["bytes_read"]) == ("incremental", CLUSTER)
    assert same(folder / str(fourth["id"]) / "disk-0.qcow2", export(disk, tmp_path / "4.raw"))
    # The exporter's vmtask_backup_last_success_timestamp has the VM's last success.
    newest = server.backups(repository)[-1].created
    samples = {s.labels["vm"]: s.value for family in families(read(server.redis))
               if family.name == "vmtask_backup_last_success_timestamp"
               for s in family.samples}
    assert newest <= samples[name] <= newest + 5


def test_untrusted_chain_is_full_and_says_why(server: VirtualServer, root: Path,
                                              name: str) -> None:
    vm = new_vm(server, name)
    disk = root / name / "disk.qcow2"
    repository = f"backups-{name}"
    write(disk, 0x11)
    backup(vm, repository)
    for existing in bitmaps(disk):  # as a disk replaced by an older copy would be
        subprocess.run(["qemu-img", "bitmap", "--remove", str(disk), existing], check=True)
    again = backup(vm, repository)
    assert again["kind"] == "full" and "no dirty bitmap" in str(again["reason"])
    forced = backup(vm, repository, full=True)
    assert (forced["kind"], forced["reason"]) == ("full", "a full backup was asked for")


def test_refused_before_queueing(server: VirtualServer, name: str) -> None:
    vm = new_vm(server, name)
    before = len(server.tasks(limit=1000))
    for bad in ("../outside", "/etc", "vms/x", ".", "", ".backups", "./.locks/x"):
        with pytest.raises(errors.InvalidArgumentError):
            vm.backup(bad)
    with pytest.raises(errors.InvalidArgumentError):
        server.restore_backup("backups-none", "20260101T000000Z-abcdef", f"{name}-r")
    with pytest.raises(errors.InvalidArgumentError):
        server.prune_backups("../x", 1)
    assert len(server.tasks(limit=1000)) == before


def test_backups_of_two_vms_into_one_repository_take_turns(server: VirtualServer,
                                                           name: str) -> None:
    first, second = new_vm(server, f"{name}-1"), new_vm(server, f"{name}-2")
    repository = f"backups-{name}"
    tasks = [first.backup(repository), second.backup(repository)]  # at once, 2 slots
    for task in tasks:
        ok(task)
    assert sorted(b.vm for b in server.backups(repository)) == [f"{name}-1", f"{name}-2"]
