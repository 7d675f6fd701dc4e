"""The disk engine on real images: real qemu-img and qemu-io, bytes checked.

Each test's ``tmp_path`` is its storage root.  Data is written with ``qemu-io`` and
verified with ``qemu-io -c "read -P ..."`` or ``qemu-img compare``, so a passing test
means the right bytes are in the right places, not just that qemu-img exited 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.enums import VMHardDiskType
from api.protocol import hresults
from tests.helpers import qemu_io
from workers.engines import qemu_img as q
from workers.engines.context import NullContext
from workers.engines.qemu_img.pinned import PinnedChain, PinnedImage
from workers.failures import (
    Cancelled,
    CorruptImage,
    DiskError,
    IllegalValue,
    OperationFailed,
    OperationTimedOut,
)

# Only for the tests that run the binaries: the pure logic (error mapping, argument
# checks, storage) is tested wherever the suite runs.
needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="qemu-img and qemu-io are required",
)

MiB = 1 << 20
# Not a whole number of MiB: shows that every format keeps the exact size.
ODD_SIZE = 20 * MiB + 7 * 512
BIG_SIZE = 512 * MiB


# --- helpers ------------------------------------------------------------------------


def identical(a: Path, b: Path) -> bool:
    """Same guest-visible bytes (qemu-img compare, formats given explicitly)."""
    result = subprocess.run(
        ["qemu-img", "compare", "-f", q.format_for(a), "-F", q.format_for(b), str(a), str(b)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 0


def leftovers(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if ".vmtask-" in path.name]


def qemu_img_processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-img") and any(text.encode() in a for a in argv):
            found.append(int(entry.name))
    return found


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class CancelOnProgress(NullContext):
    """A NullContext whose cancel flag another thread sets once progress is above 0."""

    def __init__(self) -> None:
        super().__init__("cancel-test")
        self.started = threading.Event()
        self.flipped = threading.Event()
        self._thread = threading.Thread(target=self._canceller, daemon=True)
        self._thread.start()

    def report_progress(self, percent: float) -> None:
        super().report_progress(percent)
        if percent > 0:
            self.started.set()

    def _canceller(self) -> None:
        if self.started.wait(timeout=30):
            self.cancelled = True
            self.flipped.set()

    def join(self) -> None:
        self.started.set()
        self._thread.join(timeout=5)


@pytest.fixture(scope="module")
def big_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """512 MiB of non-zero data, so a convert takes long enough to watch and cancel."""
    path = tmp_path_factory.mktemp("big") / "big.img"
    block = bytes([0xAB]) * MiB
    with open(path, "wb") as handle:
        for _ in range(BIG_SIZE // MiB):
            handle.write(block)
    return path


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs inside the storage root, to run out of space for real."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {result.stderr}")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


# --- formats and sizes --------------------------------------------------------------


# --- creating -----------------------------------------------------------------------


@needs_qemu
@pytest.mark.parametrize("name", ["d.vhd", "d.vhdx", "d.qcow2", "d.img"])
def test_create_dynamic_is_sparse_with_exact_size(tmp_path: Path, name: str) -> None:
    context = NullContext()
    disk = q.create_dynamic(tmp_path / name, ODD_SIZE, context)
    assert disk.disk_type == VMHardDiskType.Dynamic
    assert disk.virtual_size == ODD_SIZE
    assert disk.actual_size < ODD_SIZE // 2
    assert context.progress[-1] == 100.0
    assert json.loads(json.dumps(disk.to_json()))["disk_type"] == 0
    qemu_io(tmp_path / name, disk.format, f"read -P 0 0 {ODD_SIZE}")
    assert leftovers(tmp_path) == []


@needs_qemu
@pytest.mark.parametrize("name", ["f.vhd", "f.vhdx", "f.qcow2", "f.img"])
def test_create_fixed_allocates_everything(tmp_path: Path, name: str) -> None:
    context = NullContext()
    disk = q.create_fixed(tmp_path / name, 100 * MiB, context)
    assert disk.disk_type == VMHardDiskType.FixedSize
    assert disk.virtual_size == 100 * MiB
    assert disk.actual_size >= 100 * MiB
    assert context.progress == sorted(context.progress)
    assert any(0 < p < 100 for p in context.progress)
    assert context.progress[-1] == 100.0
    qemu_io(tmp_path / name, disk.format, "read -P 0 0 1M", f"read -P 0 {99 * MiB} 1M")
    assert leftovers(tmp_path) == []


@needs_qemu
def test_differencing_disk_must_be_qcow2_and_needs_its_parent(tmp_path: Path) -> None:
    q.create_dynamic(tmp_path / "base.vhd", 8 * MiB, NullContext())
    with pytest.raises(IllegalValue, match="cannot create"):
        q.create_differencing(tmp_path / "child.vhd", tmp_path / "base.vhd", NullContext())
    with pytest.raises(DiskError) as caught:
        q.create_differencing(tmp_path / "child.qcow2", tmp_path / "gone.vhd", NullContext())
    assert caught.value.hresult == hresults.FILE_NOT_FOUND
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.vhd"]


# --- converting ---------------------------------------------------------------------


@needs_qemu
def test_round_trips_between_all_formats_keep_bytes_and_exact_size(tmp_path: Path) -> None:
    first = tmp_path / "r0.vhd"
    q.create_fixed(first, ODD_SIZE, NullContext())
    last_sector = ODD_SIZE - 512
    qemu_io(
        first,
        "vpc",
        "write -P 0xab 0 1M",
        "write -P 0xcd 5M 512k",
        f"write -P 0xef {last_sector} 512",
    )
    steps = [
        ("r1.vhd", False),
        ("r2.vhdx", True),
        ("r3.vhdx", False),
        ("r4.qcow2", True),
        ("r5.qcow2", False),
        ("r6.img", True),
        ("r7.raw", False),
        ("r8.vhd", True),
    ]
    previous = first
    for name, fixed in steps:
        target = tmp_path / name
        disk = q.convert(previous, target, fixed, NullContext())
        expected = VMHardDiskType.FixedSize if fixed else VMHardDiskType.Dynamic
        assert (name, disk.disk_type) == (name, expected)
        assert (name, disk.virtual_size) == (name, ODD_SIZE)
        assert identical(first, target), name
        qemu_io(
            target,
            disk.format,
            "read -P 0xab 0 1M",
            "read -P 0 1M 4M",
            "read -P 0xcd 5M 512k",
            f"read -P 0xef {last_sector} 512",
        )
        previous = target
    assert q.info(first).disk_type == VMHardDiskType.FixedSize
    assert leftovers(tmp_path) == []


@needs_qemu
@pytest.mark.parametrize("size", [1000, ODD_SIZE])
@pytest.mark.parametrize("sparse", [True, False])
def test_info_read_without_qemu_img_equals_what_qemu_img_reports(
    tmp_path: Path, size: int, sparse: bool
) -> None:
    """The shortcuts that skip a qemu-img process (a raw file's stat, a just-written
    output's sizes) must describe each image exactly as ``qemu-img info`` does."""
    source = tmp_path / "s.img"
    with source.open("wb") as handle:
        if sparse:
            handle.truncate(size)
        else:
            handle.write(os.urandom(size))
    fd = os.open(source, os.O_RDONLY)
    try:
        pinned = PinnedChain((PinnedImage("raw", f"/proc/self/fd/{fd}"),), (fd,))
        assert q.info(source, opened=pinned) == q.info(source)
    finally:
        os.close(fd)
    for name, fixed in [("a.qcow2", False), ("b.qcow2", True), ("c.raw", False),
                        ("d.img", True), ("e.vhd", False), ("f.vhdx", True)]:
        made = q.convert(source, tmp_path / name, fixed, NullContext())
        assert (name, made) == (name, q.info(tmp_path / name))


@needs_qemu
def test_convert_leaves_the_source_untouched_and_refuses_existing_destination(
    tmp_path: Path,
) -> None:
    source = tmp_path / "src.qcow2"
    q.create_dynamic(source, 8 * MiB, NullContext())
    qemu_io(source, "qcow2", "write -P 0x5a 0 2M")
    before = sha256(source)
    existing = tmp_path / "dst.vhd"
    existing.write_bytes(b"keep me")
    with pytest.raises(DiskError) as caught:
        q.convert(source, existing, False, NullContext())
    assert caught.value.hresult == hresults.FILE_EXISTS
    assert existing.read_bytes() == b"keep me"
    q.convert(source, tmp_path / "dst2.vhd", False, NullContext())
    assert sha256(source) == before


@needs_qemu
def test_missing_source_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(DiskError) as caught:
        q.convert(tmp_path / "nope.vhd", tmp_path / "out.vhd", False, NullContext())
    assert caught.value.hresult == hresults.FILE_NOT_FOUND
    with pytest.raises(DiskError) as caught:
        q.info(tmp_path / "nope.qcow2")
    assert caught.value.hresult == hresults.FILE_NOT_FOUND

    # A missing parent is only discovered by qemu-img itself: the stderr mapping.
    q.create_dynamic(tmp_path / "base.img", 4 * MiB, NullContext())
    q.create_differencing(tmp_path / "child.qcow2", tmp_path / "base.img", NullContext())
    (tmp_path / "base.img").unlink()
    with pytest.raises(DiskError) as caught:
        q.convert(tmp_path / "child.qcow2", tmp_path / "flat.qcow2", False, NullContext())
    assert caught.value.hresult == hresults.FILE_NOT_FOUND
    assert not (tmp_path / "flat.qcow2").exists()
    assert leftovers(tmp_path) == []


@needs_qemu
@pytest.mark.parametrize("name", ["junk.qcow2", "junk.vhd", "junk.vhdx"])
def test_garbage_image_is_corrupt(tmp_path: Path, name: str) -> None:
    junk = tmp_path / name
    junk.write_bytes(os.urandom(MiB))
    with pytest.raises(CorruptImage) as caught:
        q.info(junk)
    assert caught.value.hresult == hresults.DISK_CORRUPT == 0x80070570
    with pytest.raises(CorruptImage) as caught:
        q.convert(junk, tmp_path / "out.img", False, NullContext())
    assert caught.value.hresult == hresults.DISK_CORRUPT
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@needs_qemu
def test_damaged_qcow2_metadata_is_corrupt_not_io_error(tmp_path: Path) -> None:
    """The header is fine, so info works; the copy then meets an unaligned L2 table,
    which qemu 7.2 reports as "Image is corrupt" followed by "Input/output error"."""
    disk = tmp_path / "damaged.qcow2"
    q.create_dynamic(disk, 8 * MiB, NullContext())
    qemu_io(disk, "qcow2", "write -P 0x12 0 64k")
    with open(disk, "r+b") as handle:
        header = handle.read(104)
        l1_offset = int.from_bytes(header[40:48], "big")
        handle.seek(l1_offset)
        handle.write(((1 << 63) | 0x10200).to_bytes(8, "big"))
    assert q.info(disk).virtual_size == 8 * MiB
    with pytest.raises(CorruptImage) as caught:
        q.convert(disk, tmp_path / "copy.vhd", False, NullContext())
    assert caught.value.hresult == hresults.DISK_CORRUPT
    assert "corrupt" in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged.qcow2"]


@needs_qemu
def test_file_names_do_not_fool_the_error_mapping(tmp_path: Path) -> None:
    failure = q.failure_from_stderr(
        f"Could not open '{tmp_path}/corrupt-invalid argument.qcow2': No such file or directory",
        "qemu-img info",
    )
    assert failure.hresult == hresults.FILE_NOT_FOUND


@needs_qemu
def test_progress_is_monotonic_with_intermediate_values(tmp_path: Path, big_source: Path) -> None:
    context = NullContext()
    started = time.monotonic()
    q.convert(big_source, tmp_path / "copy.vhd", False, context)
    elapsed = time.monotonic() - started
    assert context.progress == sorted(context.progress)
    intermediate = [p for p in context.progress if 5 < p < 95]
    assert len(intermediate) >= 10, (elapsed, context.progress)
    assert context.progress[-1] == 100.0
    qemu_io(tmp_path / "copy.vhd", "vpc", f"read -P 0xab {BIG_SIZE - MiB} 1M")


@needs_qemu
def test_cancel_mid_convert_kills_qemu_img_and_leaves_nothing(
    tmp_path: Path, big_source: Path
) -> None:
    context = CancelOnProgress()
    target = tmp_path / "copy.vhd"
    try:
        with pytest.raises(Cancelled) as caught:
            q.convert(big_source, target, False, context)
    finally:
        context.join()
    assert context.flipped.is_set()
    assert caught.value.hresult == hresults.E_ABORT
    assert 0 < max(context.progress) < 100
    assert qemu_img_processes_mentioning(str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []


@needs_qemu
def test_timeout_kills_qemu_img_and_leaves_nothing(tmp_path: Path, big_source: Path) -> None:
    with pytest.raises(OperationTimedOut) as caught:
        q.convert(big_source, tmp_path / "copy.vhdx", True, NullContext(), timeout=0.2)
    assert caught.value.hresult == hresults.TIMEOUT
    assert qemu_img_processes_mentioning(str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []


@needs_qemu
def test_disk_full_is_reported_and_leaves_no_partial_file(tmp_path: Path, small_fs: Path) -> None:
    with pytest.raises(DiskError) as caught:
        q.create_fixed(small_fs / "fixed.vhd", 16 * MiB, NullContext())
    assert caught.value.hresult == hresults.DISK_FULL == 0x80070070
    assert list(small_fs.iterdir()) == []

    # Here qemu-img itself hits ENOSPC: the stderr mapping.
    source = tmp_path / "data.qcow2"
    q.create_dynamic(source, 16 * MiB, NullContext())
    qemu_io(source, "qcow2", "write -P 0x77 0 16M")
    with pytest.raises(DiskError) as caught:
        q.convert(source, small_fs / "copy.qcow2", False, NullContext())
    assert caught.value.hresult == hresults.DISK_FULL
    assert list(small_fs.iterdir()) == []


# --- chains: merge_to, merge, compact -----------------------------------------------


def build_chain(root: Path) -> tuple[Path, Path, Path]:
    """base.vhd <- mid.qcow2 <- top.qcow2, with overlapping writes at each level."""
    base, mid, top = root / "base.vhd", root / "mid.qcow2", root / "top.qcow2"
    q.create_dynamic(base, 8 * MiB, NullContext())
    qemu_io(base, "vpc", "write -P 0x11 0 4M")
    q.create_differencing(mid, base, NullContext())
    qemu_io(mid, "qcow2", "write -P 0x22 1M 1M")
    q.create_differencing(top, mid, NullContext())
    qemu_io(top, "qcow2", "write -P 0x33 1536k 1M", "write -z 3M 512k")
    return base, mid, top


CHAIN_LAYOUT = (
    "read -P 0x11 0 1M",
    "read -P 0x22 1M 512k",
    "read -P 0x33 1536k 1M",
    "read -P 0x11 2560k 512k",
    "read -P 0 3M 512k",
    "read -P 0x11 3584k 512k",
    "read -P 0 4M 4M",
)


@needs_qemu
def test_merge_to_collapses_a_three_level_chain(tmp_path: Path) -> None:
    base, mid, top = build_chain(tmp_path)
    assert q.info(mid).parent == str(base)
    assert q.info(top).disk_type == VMHardDiskType.Differencing
    parents = sha256(base), sha256(mid), sha256(top)

    for name, fixed in (("flat.vhd", False), ("flat.vhdx", True)):
        context = NullContext()
        flat = q.merge_to(top, tmp_path / name, fixed, context)
        assert flat.parent is None
        assert flat.virtual_size == 8 * MiB
        assert context.progress[-1] == 100.0
        qemu_io(tmp_path / name, flat.format, *CHAIN_LAYOUT)
        assert identical(top, tmp_path / name)
    assert (sha256(base), sha256(mid), sha256(top)) == parents
    assert leftovers(tmp_path) == []


@needs_qemu
def test_merge_commits_into_the_parent(tmp_path: Path) -> None:
    base, mid, top = build_chain(tmp_path)
    context = NullContext()
    parent = q.merge(top, context)
    assert parent.file == str(mid)
    assert context.progress[-1] == 100.0
    assert context.progress == sorted(context.progress)
    qemu_io(mid, "qcow2", *CHAIN_LAYOUT)
    assert identical(top, mid)  # the merged child is now an empty overlay
    qemu_io(base, "vpc", "read -P 0x11 0 4M")  # the grandparent is not touched

    with pytest.raises(IllegalValue):
        q.merge(base, NullContext())


@needs_qemu
def test_compact_keeps_data_and_does_not_grow(tmp_path: Path) -> None:
    disk = tmp_path / "dyn.vhd"
    q.create_dynamic(disk, 32 * MiB, NullContext())
    # Explicit zeros still occupy VHD blocks: compacting is what reclaims them.
    qemu_io(disk, "vpc", "write -P 0xab 0 8M", "write -P 0 0 6M")
    reference = tmp_path / "reference.qcow2"
    q.convert(disk, reference, False, NullContext())
    before = q.info(disk)

    context = NullContext()
    after = q.compact(disk, context)
    assert after.actual_size < before.actual_size
    assert after.virtual_size == before.virtual_size == 32 * MiB
    assert after.disk_type == VMHardDiskType.Dynamic
    assert context.progress[-1] == 100.0
    assert identical(disk, reference)
    qemu_io(disk, "vpc", "read -P 0 0 6M", "read -P 0xab 6M 2M", "read -P 0 8M 24M")

    # Compacting again has nothing left to reclaim: the file must not grow.
    again = q.compact(disk, NullContext())
    assert again.actual_size <= after.actual_size
    assert identical(disk, reference)
    assert leftovers(tmp_path) == []


@needs_qemu
def test_compact_differencing_keeps_parent_and_own_data(tmp_path: Path) -> None:
    _base, mid, top = build_chain(tmp_path)
    qemu_io(top, "qcow2", "write -P 0 6M 2M")  # zeros over a zero parent: reclaimable
    reference = tmp_path / "reference.qcow2"
    q.merge_to(top, reference, False, NullContext())
    before = q.info(top)
    after = q.compact(top, NullContext())
    assert after.parent == str(mid)
    assert after.actual_size <= before.actual_size
    assert identical(top, reference)
    qemu_io(top, "qcow2", *CHAIN_LAYOUT)

    q.create_fixed(tmp_path / "fixed.qcow2", 4 * MiB, NullContext())
    with pytest.raises(IllegalValue):
        q.compact(tmp_path / "fixed.qcow2", NullContext())


# --- host drives --------------------------------------------------------------------


@needs_qemu
def test_read_only_host_drive_never_writes_the_device(tmp_path: Path) -> None:
    device = tmp_path / "device.bin"
    device.write_bytes(bytes([0x42]) * (4 * MiB))
    disk_path = tmp_path / "linked.qcow2"
    disk = q.create_host_drive(disk_path, device, NullContext())
    assert disk.disk_type == VMHardDiskType.HostDrive
    assert (disk.host_drive, disk.read_only, disk.virtual_size) == (str(device), True, 4 * MiB)
    qemu_io(disk_path, "qcow2", "read -P 0x42 0 4M")

    qemu_io(disk_path, "qcow2", "write -P 0x99 0 64k")  # lands in the qcow2 only
    assert device.read_bytes() == bytes([0x42]) * (4 * MiB)
    with pytest.raises(IllegalValue):
        q.merge(disk_path, NullContext())
    with pytest.raises(IllegalValue):
        q.compact(disk_path, NullContext())
    # qemu itself refuses to commit into the device.
    commit = subprocess.run(
        ["qemu-img", "commit", "-f", "qcow2", str(disk_path)], capture_output=True, text=True
    )
    assert commit.returncode != 0
    assert device.read_bytes() == bytes([0x42]) * (4 * MiB)

    copy = q.convert(disk_path, tmp_path / "copy.vhd", False, NullContext())
    qemu_io(tmp_path / "copy.vhd", copy.format, "read -P 0x99 0 64k", "read -P 0x42 64k 4032k")


@needs_qemu
def test_read_write_host_drive_creation_keeps_the_device_and_writes_through(
    tmp_path: Path,
) -> None:
    device = tmp_path / "device.img"
    device.write_bytes(os.urandom(4 * MiB))
    original = device.read_bytes()
    disk_path = tmp_path / "linked.qcow2"
    disk = q.create_host_drive(disk_path, device, NullContext(), read_only=False)
    assert device.read_bytes() == original  # qemu-img create would have truncated it
    assert (disk.disk_type, disk.host_drive, disk.read_only) == (
        VMHardDiskType.HostDrive,
        str(device),
        False,
    )
    assert identical(disk_path, device)
    qemu_io(disk_path, "qcow2", "write -P 0x99 0 64k")
    assert device.read_bytes()[: 64 * 1024] == bytes([0x99]) * (64 * 1024)
    assert device.read_bytes()[64 * 1024 :] == original[64 * 1024 :]
    assert leftovers(tmp_path) == []


@needs_qemu
def test_host_drive_on_a_block_device(tmp_path: Path) -> None:
    backing = tmp_path / "loop.bin"
    backing.write_bytes(bytes([0x3C]) * (8 * MiB))
    attach = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", str(backing)],
        capture_output=True,
        text=True,
    )
    if attach.returncode != 0:
        pytest.skip(f"no loop devices here: {attach.stderr.strip()}")
    loop = Path(attach.stdout.strip())
    try:
        disk = q.create_host_drive(tmp_path / "linked.qcow2", loop, NullContext())
        assert (disk.host_drive, disk.virtual_size) == (str(loop), 8 * MiB)
        qemu_io(tmp_path / "linked.qcow2", "qcow2", "read -P 0x3c 0 8M")
    finally:
        subprocess.run(["losetup", "--detach", str(loop)], capture_output=True)


# --- the runner and the error mapping -----------------------------------------------


@needs_qemu
def test_image_locked_by_another_process_is_a_sharing_violation(tmp_path: Path) -> None:
    disk = tmp_path / "busy.qcow2"
    q.create_dynamic(disk, 8 * MiB, NullContext())
    # qemu-io holds the image open read-write, as a running VM would, until stdin closes.
    holder = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", str(disk)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        fd_dir = Path(f"/proc/{holder.pid}/fd")
        while not any(os.path.realpath(fd) == str(disk) for fd in fd_dir.iterdir()):
            assert time.monotonic() < deadline, "qemu-io never opened the image"
            time.sleep(0.01)
        with pytest.raises(DiskError) as caught:
            q.convert(disk, tmp_path / "copy.img", False, NullContext())
        assert caught.value.hresult == hresults.SHARING_VIOLATION
        assert q.info(disk).virtual_size == 8 * MiB  # info reads through the lock
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
    assert leftovers(tmp_path) == []


@needs_qemu
def test_unexpected_failure_carries_stderr() -> None:
    with pytest.raises(OperationFailed) as caught:
        q.run_qemu_img(["frobnicate"], NullContext())
    assert "frobnicate" in str(caught.value)


# --- storage: confinement, temporaries, publishing ----------------------------------


