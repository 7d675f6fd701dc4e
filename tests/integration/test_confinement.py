"""Nothing leaves the storage root: escapes by name, by symlink and by backing file.

Every escape ends ACCESS_DENIED 0x80070005: `InvalidArgumentError` carrying it when
the client can tell (``..``, absolute), a DiskRelatedError task otherwise, and
nothing outside the root is read or written.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from api import HardDisk, VirtualServer, VMHardDiskType, VMTask, VMTaskResult, errors
from api.protocol import hresults
from tests.helpers import qemu_io
from workers.engines import beneath
from workers.engines.beneath import open_beneath
from workers.failures import DiskError

MiB = 1 << 20


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def denied(task: VMTask) -> None:
    assert task.wait_for_completion(60_000)
    snap = task.snapshot()
    assert (snap.result, snap.error) == (VMTaskResult.DiskRelatedError, hresults.ACCESS_DENIED), \
        snap.error_description


@pytest.fixture
def here(root: Path, request: pytest.FixtureRequest) -> Path:
    """A directory of the alpha root for this test alone."""
    directory = root / request.node.name.replace("[", "-").replace("]", "")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A raw image outside the root whose bytes must never change or leak."""
    path = tmp_path / "outside" / "secret.raw"
    path.parent.mkdir()
    path.write_bytes(b"OUTSIDE!" * (MiB // 8))
    return path


def plant(here: Path, outside: Path, how: str) -> str:
    """A qcow2 in the root whose backing name leads out of it; returns its root path."""
    planted = here / "planted.qcow2"
    if how == "absolute":
        backing = str(outside)
    elif how == "relative":
        backing = os.path.relpath(outside, here)
    elif how == "symlinked-dir":
        (here / "door").symlink_to(outside.parent)
        backing = f"door/{outside.name}"
    elif how == "json":
        backing = "json:" + json.dumps({"driver": "raw", "file": {"driver": "file",
                                                                  "filename": str(outside)}})
    else:  # a protocol: qemu would open a network connection
        backing = "nbd:127.0.0.1:9"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(planted), "1M"], check=True)
    qemu_io(planted, "qcow2", "write -P 0x61 0 4k")  # the overlay's own data
    # -u: record the name without opening it, as a hand-made image would.
    subprocess.run(["qemu-img", "rebase", "-q", "-u", "-f", "qcow2", "-b", backing, "-F", "raw",
                    str(planted)], check=True)
    return f"{here.name}/planted.qcow2"


PLANTS = ["absolute", "relative", "symlinked-dir", "json", "protocol"]


def handle(server: VirtualServer, path: str) -> HardDisk:
    """What a client holds when the file was swapped after it read the disk."""
    parent = HardDisk(server=server, host="alpha", file="base.raw", type=VMHardDiskType.FixedSize,
                      format="raw", size_in_guest=MiB, size_on_host=MiB,
                      host_free_disk_space=0, host_drive=None, parent=None)
    return HardDisk(server=server, host="alpha", file=path, type=VMHardDiskType.Differencing,
                    format="qcow2", size_in_guest=MiB, size_on_host=0,
                    host_free_disk_space=0, host_drive=None, parent=parent)


@pytest.mark.parametrize("how", PLANTS)
def test_a_planted_backing_file_is_refused_and_the_outside_is_untouched(
    server: VirtualServer, here: Path, outside: Path, how: str
) -> None:
    path = plant(here, outside, how)
    before = sha256(outside)
    with pytest.raises(errors.VMTaskError) as caught:
        server.get_hard_disk(path)
    assert caught.value.hresult == hresults.ACCESS_DENIED, caught.value
    disk = handle(server, path)
    denied(disk.convert(f"{here.name}/copy.raw", VMHardDiskType.Dynamic))
    denied(disk.merge_to(f"{here.name}/merged.qcow2", VMHardDiskType.FixedSize))
    denied(disk.merge())
    denied(disk.compact())
    denied(server.create_differencing_virtual_hard_disk(f"{here.name}/child.qcow2", path))
    assert sha256(outside) == before
    assert not (here / "copy.raw").exists() and not (here / "merged.qcow2").exists()
    assert not (here / "child.qcow2").exists()
    # Not merged anywhere: the overlay still holds its data (read without its backing).
    spec = json.dumps({"driver": "qcow2", "backing": None,
                       "file": {"driver": "file", "filename": str(here / "planted.qcow2")}})
    read = subprocess.run(["qemu-io", "-c", "read -P 0x61 0 4k", f"json:{spec}"], check=True,
                          capture_output=True, text=True)
    assert "fail" not in read.stdout.lower(), read.stdout


def test_a_planted_vm_disk_never_reaches_qemu(server: VirtualServer, here: Path,
                                              outside: Path) -> None:
    path = plant(here, outside, "absolute")
    before = sha256(outside)
    for undoable in (False, True):
        vm = server.create_virtual_machine(f"{here.name[-40:]}-{int(undoable)}", memory_mb=32,
                                           disks=[path], undoable=undoable)
        denied(vm.startup())
        assert vm.state.name == "TurnedOff"
        vm.delete().wait_for_completion(30_000)
    assert sha256(outside) == before


def test_a_chain_inside_the_root_still_works_through_descriptors(
    server: VirtualServer, here: Path
) -> None:
    """The pinned chain is the real chain: a relative backing name two levels deep."""
    base = here / "base.raw"
    base.write_bytes(b"\0" * MiB)
    qemu_io(base, "raw", "write -P 0x11 0 64k")
    (here / "sub").mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "../base.raw", "-F", "raw",
                    str(here / "sub" / "mid.qcow2")], check=True)
    qemu_io(here / "sub" / "mid.qcow2", "qcow2", "write -P 0x22 64k 64k")
    disk = server.get_hard_disk(f"{here.name}/sub/mid.qcow2")
    assert disk.parent is not None and disk.parent.file == f"{here.name}/base.raw"
    task = disk.convert(f"{here.name}/flat.raw", VMHardDiskType.Dynamic)
    assert task.wait_for_completion(60_000) and task.result is VMTaskResult.Success
    qemu_io(here / "flat.raw", "raw", "read -P 0x11 0 64k", "read -P 0x22 64k 64k")
    task = disk.merge()
    assert task.wait_for_completion(60_000) and task.result is VMTaskResult.Success
    qemu_io(base, "raw", "read -P 0x22 64k 64k")


ESCAPES: dict[str, Callable[[Path, Path], str]] = {}


def _symlinked_dir(here: Path, outside: Path) -> str:
    (here / "door").symlink_to(outside.parent)
    return f"{here.name}/door/{outside.name}"


def _symlinked_file(here: Path, outside: Path) -> str:
    (here / "file.raw").symlink_to(outside)
    return f"{here.name}/file.raw"


def _dangling(here: Path, outside: Path) -> str:
    (here / "dangling.raw").symlink_to(outside.parent / "nothing-yet.raw")
    return f"{here.name}/dangling.raw"


@pytest.mark.parametrize("make", [_symlinked_dir, _symlinked_file, _dangling],
                         ids=["symlinked-dir", "symlinked-file", "dangling"])
def test_every_symlink_escape_is_access_denied_by_the_worker(
    server: VirtualServer, here: Path, outside: Path, make: Callable[[Path, Path], str]
) -> None:
    path = make(here, outside)
    before = sha256(outside)
    with pytest.raises(errors.VMTaskError) as caught:
        server.get_hard_disk(path)
    assert caught.value.hresult == hresults.ACCESS_DENIED
    denied(server.create_dynamic_virtual_hard_disk(path, 1))
    denied(server.create_differencing_virtual_hard_disk(f"{here.name}/c.qcow2", path))
    assert sha256(outside) == before
    assert sorted(p.name for p in outside.parent.iterdir()) == [outside.name]


@pytest.mark.parametrize("path", ["../x.raw", "a/../../x.raw", "/etc/x.raw"])
def test_name_escapes_are_access_denied_at_the_client_and_at_the_worker(
    server: VirtualServer, path: str
) -> None:
    with pytest.raises(errors.InvalidArgumentError) as caught:
        server.create_dynamic_virtual_hard_disk(path, 1)
    assert caught.value.hresult == hresults.ACCESS_DENIED
    # A producer that skips the client's check meets the same rule at the worker.
    denied(server.submit("vmtask.disk.create_dynamic", description="raw escape",
                         cancelable=True, kwargs={"path": path, "size_bytes": MiB}))


@pytest.mark.parametrize("kernel", ["openat2", "walk"])
def test_open_beneath_refuses_a_directory_swapped_for_a_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: str
) -> None:
    """The swap window: the path was checked, then a directory became a symlink."""
    if kernel == "walk":  # as on a kernel before 5.6, or under a seccomp filter
        monkeypatch.setattr(beneath, "_openat2_missing", True)
    else:
        root_fd = os.open(tmp_path, os.O_PATH)
        (tmp_path / "probe").write_text("")
        fd = beneath._openat2(root_fd, "probe", os.O_RDONLY)
        os.close(root_fd)
        assert fd is not None, "openat2 is missing on this kernel"
        os.close(fd)
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_text("in")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "f").write_text("out")
    checked = root / "d" / "f"
    os.close(open_beneath(root, checked))
    (root / "d").rename(root / "d.old")
    (root / "d").symlink_to(tmp_path / "out")
    with pytest.raises(DiskError) as caught:
        open_beneath(root, checked)
    assert caught.value.hresult == hresults.ACCESS_DENIED
    (root / "d.old" / "f").unlink()
    (root / "d.old" / "f").symlink_to(tmp_path / "out" / "f")
    with pytest.raises(DiskError):
        open_beneath(root, root / "d.old" / "f")
