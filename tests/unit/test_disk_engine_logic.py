"""The disk engine's pure logic, with no qemu-img needed: formats and sizes, stderr
mapping, refusals before anything runs, path confinement, temporaries, publishing."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from api.protocol import hresults
from workers.engines import qemu_img as q
from workers.engines.context import NullContext
from workers.engines.storage import (
    free_space,
    publish_atomically,
    remove_stale_temporaries,
    resolve_in_root,
    temporary_path_for,
)
from workers.failures import (
    Cancelled,
    CorruptImage,
    DiskError,
    IllegalValue,
    OperationFailed,
)

# Only for the tests that run the binaries: the pure logic (error mapping, argument
# checks, storage) is tested wherever the suite runs.

MiB = 1 << 20
GiB = 1 << 30
# Not a whole number of MiB: shows that every format keeps the exact size.


# --- helpers ------------------------------------------------------------------------


def leftovers(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if ".vmtask-" in path.name]


# --- formats and sizes --------------------------------------------------------------


def test_format_by_extension_and_unsupported_extension(tmp_path: Path) -> None:
    assert [q.format_for(f"x{s}") for s in (".vhd", ".VHDX", ".qcow2", ".img", ".raw")] == [
        "vpc",
        "vhdx",
        "qcow2",
        "raw",
        "raw",
    ]
    with pytest.raises(IllegalValue) as caught:
        q.create_dynamic(tmp_path / "disk.vmdk", 10 * MiB, NullContext())
    assert caught.value.hresult == hresults.E_INVALIDARG
    with pytest.raises(IllegalValue):
        q.create_dynamic(tmp_path / "disk", 10 * MiB, NullContext())
    assert list(tmp_path.iterdir()) == []


def test_sizes_beyond_the_format_maximum_are_illegal(tmp_path: Path) -> None:
    q.check_size("vpc", 2040 * GiB)
    for fmt, size in (("vpc", 2041 * GiB), ("vhdx", 65 * (GiB << 10)), ("qcow2", 1 << 60)):
        with pytest.raises(IllegalValue):
            q.check_size(fmt, size)
    for bad in (0, -512, 1000):
        with pytest.raises(IllegalValue):
            q.check_size("raw", bad)

    for create in (q.create_dynamic, q.create_fixed):
        with pytest.raises(IllegalValue) as caught:
            create(tmp_path / "huge.vhd", 2041 * GiB, NullContext())
        assert caught.value.hresult == hresults.E_INVALIDARG
        assert "2040 GiB" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_producer_side_table_matches_the_engine() -> None:
    """api.protocol.formats mirrors these tables so a producer can refuse early without workers."""
    formats = pytest.importorskip("api.protocol.formats")
    assert dict(formats.FORMAT_BY_EXTENSION) == dict(q.FORMAT_BY_EXTENSION)
    assert dict(formats.MAX_SIZE_BYTES) == dict(q.MAX_SIZE_BYTES)


# --- creating -----------------------------------------------------------------------


def test_create_refuses_an_existing_target(tmp_path: Path) -> None:
    target = tmp_path / "taken.vhd"
    target.write_bytes(b"precious")
    for create in (q.create_dynamic, q.create_fixed):
        with pytest.raises(DiskError) as caught:
            create(target, 10 * MiB, NullContext())
        assert caught.value.hresult == hresults.FILE_EXISTS
    assert target.read_bytes() == b"precious"


# --- converting ---------------------------------------------------------------------


# --- chains: merge_to, merge, compact -----------------------------------------------


# --- host drives --------------------------------------------------------------------


def test_host_drive_validation(tmp_path: Path) -> None:
    with pytest.raises(IllegalValue):
        q.create_host_drive(tmp_path / "linked.vhd", Path("/dev/null"), NullContext())
    with pytest.raises(DiskError) as caught:
        q.create_host_drive(tmp_path / "linked.qcow2", tmp_path / "absent", NullContext())
    assert caught.value.hresult == hresults.FILE_NOT_FOUND
    with pytest.raises(IllegalValue):  # a character device is not a disk
        q.create_host_drive(tmp_path / "linked.qcow2", Path("/dev/null"), NullContext())
    assert list(tmp_path.iterdir()) == []


# --- the runner and the error mapping -----------------------------------------------


@pytest.mark.parametrize(
    ("stderr", "kind", "hresult"),
    [
        ("error while writing at byte 0: No space left on device", DiskError, hresults.DISK_FULL),
        ("Could not open 'a': No such file or directory", DiskError, hresults.FILE_NOT_FOUND),
        ("Could not open 'a': Permission denied", DiskError, hresults.ACCESS_DENIED),
        ("Could not create 'a': File exists", DiskError, hresults.FILE_EXISTS),
        ("error while reading at byte 0: Input/output error", DiskError, hresults.WRITE_FAULT),
        ("Could not open 'a': Image is not in qcow2 format", CorruptImage, hresults.DISK_CORRUPT),
        ("Could not open 'a': Could not open 'a': Invalid argument", CorruptImage, 0x80070570),
        ("qcow2: Marking image as corrupt: L2 table offset", CorruptImage, 0x80070570),
        ("Something nobody expected", OperationFailed, hresults.E_UNEXPECTED),
    ],
)
def test_stderr_mapping(stderr: str, kind: type[OperationFailed], hresult: int) -> None:
    failure = q.failure_from_stderr(stderr, "qemu-img convert")
    assert type(failure) is kind
    assert failure.hresult == hresult
    assert stderr in str(failure)


def test_cancel_before_start_runs_nothing(tmp_path: Path) -> None:
    context = NullContext()
    context.cancelled = True
    with pytest.raises(Cancelled):
        q.create_dynamic(tmp_path / "d.qcow2", MiB, context)
    assert list(tmp_path.iterdir()) == []


# --- storage: confinement, temporaries, publishing ----------------------------------


def test_paths_are_confined_to_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "disks").mkdir()
    (root / "link").symlink_to(outside)
    (root / "evil.vhd").symlink_to(outside / "target.vhd")  # dangling, points out
    (root / "disks" / "up").symlink_to(Path("..") / ".." / "outside")
    (root / "fine.vhd").symlink_to(root / "disks" / "real.vhd")

    for escape in (
        "../outside/x.vhd",
        "disks/../../outside/x.vhd",
        str(outside / "x.vhd"),
        "/etc/passwd",
        "link/x.vhd",
        "evil.vhd",
        "disks/up/x.vhd",
    ):
        with pytest.raises(DiskError) as caught:
            resolve_in_root(root, escape)
        assert caught.value.hresult == hresults.ACCESS_DENIED, escape
    for malformed in ("", "   ", "a\0b", ".", "disks/.."):
        with pytest.raises(IllegalValue):
            resolve_in_root(root, malformed)

    assert resolve_in_root(root, "disks/a.vhd") == root.resolve() / "disks" / "a.vhd"
    assert resolve_in_root(root, "disks/../b.vhd") == root.resolve() / "b.vhd"
    assert resolve_in_root(root, str(root / "disks" / "c.vhd")) == root.resolve() / "disks/c.vhd"
    assert resolve_in_root(root, "fine.vhd") == root.resolve() / "disks" / "real.vhd"
    with pytest.raises(DiskError) as caught:
        resolve_in_root(root, "disks/missing.vhd", must_exist=True)
    assert caught.value.hresult == hresults.FILE_NOT_FOUND

    # An operation handed a refused path never starts, so nothing appears outside.
    for escape in ("link/x.vhd", "evil.vhd"):
        with pytest.raises(DiskError):
            q.create_dynamic(resolve_in_root(root, escape), MiB, NullContext())
    assert list(outside.iterdir()) == []


def test_temporary_names_and_stale_cleanup(tmp_path: Path) -> None:
    target = tmp_path / "disks" / "a.vhd"
    target.parent.mkdir()
    temp = temporary_path_for(target, "1234-abcd")
    assert temp.parent == target.parent
    assert temp.name.startswith(".a.vhd.") and temp.name.endswith(".tmp")
    assert "1234-abcd" in temp.name
    with pytest.raises(IllegalValue):
        temporary_path_for(target, "../x")
    long_target = tmp_path / ("x" * 250 + ".vhd")
    assert len(temporary_path_for(long_target, "t" * 36).name) <= 255

    dead = temporary_path_for(target, "dead-task")
    live = temporary_path_for(tmp_path / "b.qcow2", "live-task")
    dead.write_bytes(b"partial")
    live.write_bytes(b"in progress")
    unrelated = tmp_path / "disks" / "notes.tmp"
    unrelated.write_bytes(b"not ours")
    outside_file = tmp_path.parent / f"{tmp_path.name}-outside.bin"
    outside_file.write_bytes(b"outside")
    sneaky = temporary_path_for(tmp_path / "c.vhd", "gone")
    sneaky.symlink_to(outside_file)
    try:
        removed = remove_stale_temporaries(tmp_path, lambda task_id: task_id == "live-task")
        assert sorted(removed) == sorted([dead, sneaky])
        assert live.exists() and unrelated.exists() and outside_file.exists()
        assert remove_stale_temporaries(tmp_path) == [live]
        assert leftovers(tmp_path) == []
    finally:
        outside_file.unlink()


def test_publish_never_overwrites(tmp_path: Path) -> None:
    temp = tmp_path / ".new.vmtask-t.tmp"
    target = tmp_path / "new.img"
    temp.write_bytes(b"new")
    target.write_bytes(b"old")
    with pytest.raises(DiskError) as caught:
        publish_atomically(temp, target)
    assert caught.value.hresult == hresults.FILE_EXISTS
    assert target.read_bytes() == b"old"
    target.unlink()
    publish_atomically(temp, target)
    assert target.read_bytes() == b"new"
    assert not temp.exists()


def test_free_space(tmp_path: Path) -> None:
    stats = os.statvfs(tmp_path)
    assert abs(free_space(tmp_path) - stats.f_bavail * stats.f_frsize) < 64 * MiB
    assert free_space(tmp_path / "not" / "yet") > 0


def _qcow2_header(version: int, incompatible: int, extensions: bytes) -> bytes:
    """A qcow2 header as docs/interop/qcow2.txt lays it out (104 bytes for v3)."""
    head = struct.pack(">4sIQIIQIIQQIIQQQQII", b"QFI\xfb", version, 0, 0, 16, 1 << 20, 0,
                       0, 0, 0, 0, 0, 0, incompatible, 0, 0, 4, 104)
    return head + extensions + b"\0" * 8


def _extension(kind: int, data: bytes) -> bytes:
    return struct.pack(">II", kind, len(data)) + data + b"\0" * (-len(data) % 8)


@pytest.mark.parametrize(("version", "incompatible", "extensions", "expected"), [
    (3, 4, _extension(0x6803F857, b"x" * 12) + _extension(0x44415441, b"../out/d.raw"),
     "../out/d.raw"),
    (3, 0, _extension(0x44415441, b"/dev/sda"), None),  # no feature bit: qemu ignores it
    (3, 4, b"", None),  # bit without a name: qemu refuses the image itself
    (2, 4, _extension(0x44415441, b"/dev/sda"), None),  # v2 has no incompatible features
])
def test_the_qcow2_data_file_name_is_read_from_the_header(
    tmp_path: Path, version: int, incompatible: int, extensions: bytes, expected: str | None
) -> None:
    image = tmp_path / "i.qcow2"
    image.write_bytes(_qcow2_header(version, incompatible, extensions))
    fd = os.open(image, os.O_RDONLY)
    try:
        assert q.qcow2_data_file(fd) == expected
    finally:
        os.close(fd)
    image.write_bytes(b"QFI\xfb\0\0")  # truncated: best effort gives None
    fd = os.open(image, os.O_RDONLY)
    try:
        assert q.qcow2_data_file(fd) is None
    finally:
        os.close(fd)
