"""The disk engine: every disk operation on real image files, done by ``qemu-img``.

Formats follow the file extension and are always passed explicitly (``-f``/``-O``/
``-F``): an image is never probed, so a guest cannot make a raw disk look like a
qcow2 with a backing file of its choosing.

======== ========= ================================================================
suffix   format    notes
======== ========= ================================================================
.vhd     vpc       ``force_size=on`` always, so the exact byte size is kept
.vhdx    vhdx
.qcow2   qcow2     the only format qemu can write differencing and host-drive disks in
.img     raw
.raw     raw
======== ========= ================================================================

Every operation that produces a file builds it under a temporary name beside the
target and publishes it with `workers.engines.storage.publish_atomically` only on success; a
failure or a cancel removes the temporary.  Paths given to the operations are
absolute and already confined by `workers.engines.storage.resolve_in_root`.

Host-drive disks ("linked" disks: a small image whose data is a host block device or
file) are qcow2 files that reference the device without copying it:

* ``read_only=True`` (default): the device is the qcow2's *backing file*, named by a
  ``json:`` filename that opens it with ``read-only: true``.  QEMU only ever reads a
  backing file, and the forced read-only flag makes even ``qemu-img commit`` into it
  fail, so nothing vmtask or QEMU does can write the device.  Guest writes land in
  the small qcow2 (copy-on-write); the VM engine should also attach such a disk
  read-only (`DiskInfo.read_only`) so the guest sees a read-only drive.
* ``read_only=False``: the device is the qcow2's raw *external data file*
  (``data_file_raw=on``): guest writes go straight to the device.

`info` reports both as `VMHardDiskType.HostDrive` with the device in
`DiskInfo.host_drive`.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import signal
import stat
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from api.enums import VMHardDiskType
from api.protocol import formats, hresults
from workers.engines.context import OperationContext
from workers.engines.storage import (
    publish_atomically,
    remove_quietly,
    temporary_path_for,
)
from workers.failures import (
    ERRNO_TO_HRESULT,
    Cancelled,
    CorruptImage,
    DiskError,
    IllegalValue,
    OperationFailed,
    OperationTimedOut,
)

# --- formats and sizes: plain data, cheap to import --------------------------------

KiB = formats.KiB
MiB = formats.MiB
GiB = formats.GiB
TiB = formats.TiB
PiB = formats.PiB
SECTOR = 512

# One table for both sides: producers check sizes and extensions before queueing.
FORMAT_BY_EXTENSION = formats.FORMAT_BY_EXTENSION
MAX_SIZE_BYTES = formats.MAX_SIZE_BYTES
FORMAT_NAMES = formats.FORMAT_NAMES


def format_for(path: str | os.PathLike[str]) -> str:
    """The qemu format name for a disk path, from its extension; else IllegalValue."""
    try:
        return formats.format_for_name(os.fspath(path))
    except formats.FormatError as exc:
        raise IllegalValue(str(exc)) from None


def check_maximum(fmt: str, size_bytes: int) -> None:
    """IllegalValue when ``size_bytes`` is beyond what format ``fmt`` can hold."""
    try:
        formats.check_maximum(fmt, size_bytes)
    except formats.FormatError as exc:
        raise IllegalValue(str(exc)) from None


def check_size(fmt: str, size_bytes: int) -> None:
    """Validate a requested disk size for format ``fmt``; IllegalValue when unusable.

    The size must be a positive whole number of 512-byte sectors, so that every
    format stores it exactly, and within the format's maximum.
    """
    if isinstance(size_bytes, bool) or not isinstance(size_bytes, int):
        raise IllegalValue(f"The disk size must be an integer number of bytes, not {size_bytes!r}")
    if size_bytes <= 0:
        raise IllegalValue("The disk size must be greater than zero")
    if size_bytes % SECTOR:
        raise IllegalValue(f"The disk size {size_bytes} is not a multiple of {SECTOR} bytes")
    check_maximum(fmt, size_bytes)


# --- image information ------------------------------------------------------------


@dataclass(frozen=True)
class DiskInfo:
    """What `info` learns about one image file (sizes in bytes)."""

    file: str
    format: str
    disk_type: VMHardDiskType
    virtual_size: int
    actual_size: int
    parent: str | None
    """The backing file of a differencing disk, as an absolute path."""
    host_drive: str | None = None
    """The host block device or file a host-drive disk is bound to."""
    read_only: bool = False
    """True for a host-drive disk whose device must never be written."""

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["disk_type"] = int(self.disk_type)
        return data


_VHD_COOKIE = b"conectix"
_VHD_TYPES = {
    2: VMHardDiskType.FixedSize,
    3: VMHardDiskType.Dynamic,
    4: VMHardDiskType.Differencing,
}


def _vhd_disk_type(path: Path) -> VMHardDiskType | None:
    """The disk type field (offset 60) of a VHD footer.

    A fixed disk has its footer only at the end; dynamic and differencing disks also
    keep a copy at offset 0.  Very old VHDs have a 511-byte footer, hence the retries.
    """
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            for offset in (size - 512, size - 511, 0):
                if offset < 0:
                    continue
                handle.seek(offset)
                footer = handle.read(512)
                if footer[:8] == _VHD_COOKIE and len(footer) >= 64:
                    (disk_type,) = struct.unpack_from(">I", footer, 60)
                    return _VHD_TYPES.get(disk_type)
    except OSError:
        return None
    return None


_VHDX_METADATA_REGION = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
_VHDX_FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B").bytes_le
_VHDX_REGION_TABLE_OFFSET = 192 * KiB


def _vhdx_file_flags(path: Path) -> int | None:
    """The File Parameters flags of a VHDX (bit 0: LeaveBlocksAllocated, i.e. fixed;
    bit 1: HasParent), read from the first region table and the metadata table."""
    try:
        with open(path, "rb") as handle:
            if handle.read(8) != b"vhdxfile":
                return None
            handle.seek(_VHDX_REGION_TABLE_OFFSET)
            table = handle.read(64 * KiB)
            if table[:4] != b"regi":
                return None
            (count,) = struct.unpack_from("<I", table, 8)
            metadata_offset = None
            for index in range(min(count, 2047)):
                entry = table[16 + 32 * index : 48 + 32 * index]
                if entry[:16] == _VHDX_METADATA_REGION:
                    (metadata_offset,) = struct.unpack_from("<Q", entry, 16)
                    break
            if metadata_offset is None:
                return None
            handle.seek(metadata_offset)
            metadata = handle.read(64 * KiB)
            if metadata[:8] != b"metadata":
                return None
            (entries,) = struct.unpack_from("<H", metadata, 10)
            for index in range(min(entries, 2047)):
                entry = metadata[32 + 32 * index : 64 + 32 * index]
                if entry[:16] == _VHDX_FILE_PARAMETERS:
                    (item_offset,) = struct.unpack_from("<I", entry, 16)
                    handle.seek(metadata_offset + item_offset)
                    _block_size, flags = struct.unpack("<II", handle.read(8))
                    return int(flags)
    except (OSError, struct.error):
        return None
    return None


def _host_drive_from_backing(backing: str) -> str | None:
    """The device named by a host-drive backing file (a ``json:`` filename)."""
    if not backing.startswith("json:"):
        return None
    try:
        options = json.loads(backing[len("json:") :])
        filename = options["file"]["filename"]
    except (ValueError, KeyError, TypeError):
        return None
    return filename if isinstance(filename, str) else None


def _absolute_beside(image: Path, name: str) -> str:
    """A backing or data file name as qemu resolves it: relative to the image's directory."""
    return os.path.normpath(os.path.join(image.parent, name))


def _query(path: Path, timeout: float | None) -> dict[str, Any]:
    """The raw ``qemu-img info --output=json`` of one image (not its backing chain)."""
    fmt = format_for(path)
    if not os.path.lexists(path):
        raise DiskError(f"{path} does not exist", hresults.FILE_NOT_FOUND)
    # -U: reading the header of a disk that a running VM holds open is harmless, and
    # without it qemu-img refuses for the VM's write lock.
    output = run_qemu_img(
        ["info", "--output=json", "-U", "-f", fmt, str(path)], _QUIET, timeout=timeout
    )
    try:
        data = json.loads(output)
        int(data["virtual-size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise OperationFailed(
            f"Unexpected qemu-img info output for {path}: {output[:500]}"
        ) from exc
    if not isinstance(data, dict):
        raise OperationFailed(f"Unexpected qemu-img info output for {path}: {output[:500]}")
    return data


def info(path: Path, *, timeout: float | None = 60.0) -> DiskInfo:
    """Describe the image at ``path`` (``qemu-img info --output=json -f <fmt>``)."""
    path = Path(path)
    return _describe(path, _query(path, timeout))


def _describe(path: Path, data: dict[str, Any]) -> DiskInfo:
    fmt = format_for(path)
    virtual_size = int(data["virtual-size"])
    actual_size = int(data.get("actual-size", 0))
    backing = data.get("backing-filename")
    specific = data.get("format-specific", {}).get("data", {})
    parent: str | None = None
    host_drive: str | None = None
    read_only = False

    if fmt == "qcow2" and isinstance(specific.get("data-file"), str):
        disk_type = VMHardDiskType.HostDrive
        host_drive = _absolute_beside(path, specific["data-file"])
    elif isinstance(backing, str) and _host_drive_from_backing(backing) is not None:
        disk_type = VMHardDiskType.HostDrive
        host_drive = _host_drive_from_backing(backing)
        read_only = True
    elif isinstance(backing, str) and backing:
        disk_type = VMHardDiskType.Differencing
        parent = _absolute_beside(path, backing)
    elif fmt == "vpc":
        found = _vhd_disk_type(path)
        if found is None:
            # qemu only reports a block size for dynamic VHDs.
            found = VMHardDiskType.Dynamic if "cluster-size" in data else VMHardDiskType.FixedSize
        disk_type = found
    elif fmt == "vhdx":
        flags = _vhdx_file_flags(path)
        if flags is not None and flags & 2:
            disk_type = VMHardDiskType.Differencing
        elif flags is not None and flags & 1:
            disk_type = VMHardDiskType.FixedSize
        else:
            disk_type = VMHardDiskType.Dynamic
    else:
        # qcow2 and raw record no "fixed" flag: a disk whose file holds at least its
        # whole virtual size is fixed (preallocated); a fully written dynamic disk is
        # indistinguishable from one.
        disk_type = (
            VMHardDiskType.FixedSize if actual_size >= virtual_size else VMHardDiskType.Dynamic
        )
    return DiskInfo(
        file=str(path),
        format=fmt,
        disk_type=disk_type,
        virtual_size=virtual_size,
        actual_size=actual_size,
        parent=parent,
        host_drive=host_drive,
        read_only=read_only,
    )


# --- running qemu-img -------------------------------------------------------------

POLL_INTERVAL = 0.1
KILL_GRACE = 2.0
_PROGRESS = re.compile(rb"\(\s*(\d+(?:\.\d+)?)/100%\)")
_STDERR_LIMIT = 64 * KiB


class _QuietContext:
    """For short internal runs that report nothing and are not cancelled."""

    task_id = "internal"

    def report_progress(self, percent: float) -> None:
        pass

    def cancel_requested(self) -> bool:
        return False


_QUIET = _QuietContext()


class _Progress:
    """Maps a step's own 0..100 onto its slice of the task's progress, never backwards."""

    def __init__(self, context: OperationContext, low: float, high: float) -> None:
        self._context = context
        self._low = low
        self._high = high
        self._last = -1.0

    def step(self, percent: float) -> None:
        percent = min(max(percent, 0.0), 100.0)
        value = self._low + (self._high - self._low) * percent / 100.0
        if value > self._last:
            self._last = value
            self._context.report_progress(value)


class _ProgressParser:
    """Finds qemu-img's ``(12.34/100%)`` records in stdout chunks split anywhere."""

    def __init__(self, progress: _Progress) -> None:
        self._progress = progress
        self._pending = b""

    def feed(self, chunk: bytes) -> None:
        data = self._pending + chunk
        end = 0
        for match in _PROGRESS.finditer(data):
            self._progress.step(float(match.group(1)))
            end = match.end()
        # Only a partial record can span chunks, and records are short.
        self._pending = data[end:][-64:]


# qemu-img runs in its own session (so a cancel can kill its whole group), which
# also means it would outlive a worker killed with -9 and go on writing.  setpriv
# (util-linux, essential on Debian) sets the parent-death signal, kept across exec.
_DIE_WITH_PARENT: list[str] = (
    ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
)


def _qemu_img_binary() -> str:
    return shutil.which("qemu-img") or "qemu-img"


def _child_environment() -> dict[str, str]:
    # The error mapping reads English strerror() texts.
    return {**os.environ, "LC_ALL": "C", "LANG": "C"}


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL it after a grace period, and reap it.

    The group id equals the pid (start_new_session); it cannot be reused while the
    leader is unreaped, so the signals are only sent while ``returncode`` is None.
    """
    if process.returncode is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=KILL_GRACE)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


_DISK_FULL = ("no space left on device", "disk quota exceeded")
_IO_ERROR = ("input/output error",)
_ACCESS = (
    "permission denied",
    "operation not permitted",
    "read-only file system",
    "block node is read-only",
)
# qemu's image locking: a running VM (or another qemu-img) has the image open.
_IN_USE = ("is another process using the image", "failed to get")
_NOT_FOUND = ("no such file or directory", "no such device")
_EXISTS = ("file exists",)
_TOO_LARGE = (
    "image size is too large",
    "image size too large",
    "invalid image size",
    "file too large",
)
# Signs of a damaged image that win over the errno text that follows them: qemu 7.2
# reports bad qcow2 metadata as "Image is corrupt: ..." and then "Input/output error".
_CORRUPT = (
    "corrupt",
    "image is not in",
    "invalid vpc image",
    "header too short",
    "invalid footer",
    "invalid header",
    "bad magic",
    "unsupported qcow version",
    "unsupported qcow2 version",
    "not a vhdx",
    "invalid l1",
    "invalid backing file",
    "exceeds the maximum",
)
# Weaker signs, only trusted when no errno text explains the failure better.
_PROBABLY_CORRUPT = ("invalid argument", "could not read")


_QUOTED = re.compile(r"'[^']*'")


def failure_from_stderr(
    stderr: str, action: str = "qemu-img", paths: Sequence[str] = ()
) -> OperationFailed:
    """The failure that a qemu-img error text means.

    File names are blanked out before matching (quoted ones, and ``paths``), so a
    disk called ``corrupt.qcow2`` that is merely missing is not reported as corrupt.
    """
    text = stderr.strip()
    matchable = text
    for path in sorted(paths, key=len, reverse=True):
        matchable = matchable.replace(path, " ")
    lowered = _QUOTED.sub(" ", matchable).lower()
    description = f"{action} failed: {text}" if text else f"{action} failed"

    def has(words: Sequence[str]) -> bool:
        return any(word in lowered for word in words)

    if has(_DISK_FULL):
        return DiskError(description, hresults.DISK_FULL)
    if has(_CORRUPT):
        return CorruptImage(description)
    if has(_IO_ERROR):
        return DiskError(description, hresults.WRITE_FAULT)
    if has(_IN_USE):
        return DiskError(description, hresults.SHARING_VIOLATION)
    if has(_ACCESS):
        return DiskError(description, hresults.ACCESS_DENIED)
    if has(_NOT_FOUND):
        return DiskError(description, hresults.FILE_NOT_FOUND)
    if has(_EXISTS):
        return DiskError(description, hresults.FILE_EXISTS)
    if has(_TOO_LARGE):
        return IllegalValue(description)
    if has(_PROBABLY_CORRUPT):
        return CorruptImage(description)
    return OperationFailed(description)


def run_qemu_img(
    args: Sequence[str],
    context: OperationContext,
    *,
    progress_range: tuple[float, float] = (0.0, 100.0),
    timeout: float | None = None,
    cancelable: bool = True,
) -> str:
    """Run ``qemu-img <args>`` and return its stdout.

    qemu-img runs in its own session, so cancel and timeout kill its whole process
    group.  ``-p`` progress records are scaled into ``progress_range`` and reported
    monotonically.  ``cancel_requested()`` is polled about every `POLL_INTERVAL`
    seconds unless ``cancelable`` is false (for steps that modify an image in place,
    where stopping halfway is worse than finishing).  Failures are mapped from stderr
    by `failure_from_stderr`.
    """
    if cancelable and context.cancel_requested():
        raise Cancelled()
    deadline = None if timeout is None else time.monotonic() + timeout
    action = f"qemu-img {args[0]}" if args else "qemu-img"
    try:
        process = subprocess.Popen(
            [*_DIE_WITH_PARENT, _qemu_img_binary(), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env=_child_environment(),
        )
    except FileNotFoundError as exc:
        raise OperationFailed("qemu-img is not installed on this worker host") from exc

    parser = _ProgressParser(_Progress(context, *progress_range))
    stdout = bytearray()
    stderr = bytearray()
    assert process.stdout is not None and process.stderr is not None

    next_poll = time.monotonic() + POLL_INTERVAL

    def check_stop() -> None:
        nonlocal next_poll
        now = time.monotonic()
        # Progress output wakes the loop far more often than cancel needs polling,
        # and cancel_requested() may be a Redis round trip.
        if cancelable and now >= next_poll:
            next_poll = now + POLL_INTERVAL
            if context.cancel_requested():
                _kill_group(process)
                raise Cancelled()
        if deadline is not None and now >= deadline:
            _kill_group(process)
            raise OperationTimedOut(f"{action} did not finish within {timeout:g} s")

    try:
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ, stdout)
            selector.register(process.stderr, selectors.EVENT_READ, stderr)
            while selector.get_map():
                for key, _events in selector.select(POLL_INTERVAL):
                    chunk = os.read(key.fd, 64 * KiB)
                    if not chunk:
                        selector.unregister(key.fileobj)
                        continue
                    buffer: bytearray = key.data
                    if buffer is stdout:
                        parser.feed(chunk)
                        buffer.extend(chunk)
                    elif len(buffer) < _STDERR_LIMIT:
                        buffer.extend(chunk)
                check_stop()
        while True:
            try:
                returncode = process.wait(timeout=POLL_INTERVAL)
                break
            except subprocess.TimeoutExpired:
                check_stop()
    finally:
        # Whatever escaped above (even a failing cancel_requested()), no qemu-img
        # may outlive this call.
        _kill_group(process)
        process.stdout.close()
        process.stderr.close()

    if returncode != 0:
        paths = [arg for arg in args if os.sep in arg]
        raise failure_from_stderr(_clean_stderr(stderr), action, paths)
    return stdout.decode(errors="replace")


def _clean_stderr(raw: bytes | bytearray) -> str:
    text = raw.decode(errors="replace")
    return "\n".join(line.removeprefix("qemu-img: ") for line in text.strip().splitlines())


# --- shared helpers for operations ------------------------------------------------


class _Deadline:
    def __init__(self, timeout: float | None) -> None:
        self._timeout = timeout
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        if self._end is None:
            return None
        left = self._end - time.monotonic()
        if left <= 0:
            raise OperationTimedOut(f"The operation did not finish within {self._timeout:g} s")
        return left


def _require_absolute(path: Path) -> Path:
    path = Path(path)
    if not path.is_absolute():
        raise IllegalValue(f"{path} is not an absolute, resolved path")
    return path


def _require_source(path: Path) -> Path:
    path = _require_absolute(path)
    if not os.path.lexists(path):
        raise DiskError(f"{path} does not exist", hresults.FILE_NOT_FOUND)
    return path


def _require_new_target(path: Path) -> Path:
    path = _require_absolute(path)
    if os.path.lexists(path):
        raise DiskError(f"{path} already exists", hresults.FILE_EXISTS)
    if not path.parent.is_dir():
        raise DiskError(f"The directory {path.parent} does not exist", hresults.FILE_NOT_FOUND)
    return path


def _task_id(context: OperationContext, task_id: str | None) -> str:
    return task_id if task_id is not None else context.task_id


def _disk_error(exc: OSError, what: str) -> DiskError:
    code = ERRNO_TO_HRESULT.get(exc.errno or 0, hresults.WRITE_FAULT)
    return DiskError(f"{what}: {exc.strerror or exc}", code)


@contextmanager
def _new_output(target: Path, task_id: str) -> Iterator[Path]:
    """Yield the temporary path to build ``target`` in; publish it if the body succeeds.

    The temporary is removed on every way out, so a failure or a cancel leaves
    nothing behind, and after a successful publish it no longer exists anyway.
    """
    temp = temporary_path_for(target, task_id)
    remove_quietly(temp)  # an earlier attempt of this same task may have died here
    try:
        yield temp
        _fsync(temp)
        publish_atomically(temp, target)
        _fsync_directory(target.parent)
    finally:
        remove_quietly(temp)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise _disk_error(exc, f"Cannot open {path}") from exc
    try:
        os.fsync(fd)
    except OSError as exc:
        raise _disk_error(exc, f"Cannot flush {path}") from exc
    finally:
        os.close(fd)


def _fsync_directory(directory: Path) -> None:
    # Best effort: makes the rename durable; some filesystems refuse directory fsync.
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


ALLOCATION_CHUNK = 64 * MiB


def _allocate(
    path: Path, context: OperationContext, progress: _Progress, deadline: _Deadline
) -> None:
    """Reserve every byte of ``path`` on disk, chunk by chunk.

    This is what makes a fixed disk fixed: qemu-img leaves holes, and a hole would
    turn into ENOSPC inside a running guest.  Here ENOSPC surfaces as disk full, and
    cancel and the deadline are honoured between chunks.
    """
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        raise _disk_error(exc, f"Cannot open {path}") from exc
    try:
        size = os.fstat(fd).st_size
        offset = 0
        progress.step(0.0)
        while offset < size:
            if context.cancel_requested():
                raise Cancelled()
            deadline.remaining()
            length = min(ALLOCATION_CHUNK, size - offset)
            try:
                # glibc falls back to writing a zero byte only into blocks that read
                # as zero, so existing data is never touched.
                os.posix_fallocate(fd, offset, length)
            except OSError as exc:
                raise _disk_error(exc, f"Cannot allocate {path}") from exc
            offset += length
            progress.step(100.0 * offset / size)
    finally:
        os.close(fd)


def _create_options(fmt: str, fixed: bool) -> list[str]:
    """``-o`` options for a new image; fixed ones are preallocated by `_allocate`."""
    if fmt == "vpc":
        subformat = "fixed" if fixed else "dynamic"
        return ["-o", f"subformat={subformat},force_size=on"]
    if fmt == "vhdx":
        return ["-o", f"subformat={'fixed' if fixed else 'dynamic'}"]
    if fmt == "qcow2" and fixed:
        # Map every cluster now; _allocate then backs the mapped area with blocks.
        return ["-o", "preallocation=metadata"]
    return []


def _escape_option(value: str) -> str:
    # qemu's -o parser treats "," as a separator and ",," as a literal comma.
    return value.replace(",", ",,")


# --- operations -------------------------------------------------------------------


def _create_image(
    temp: Path,
    fmt: str,
    size_bytes: int,
    fixed: bool,
    context: OperationContext,
    timeout: float | None,
) -> None:
    run_qemu_img(
        ["create", "-q", "-f", fmt, *_create_options(fmt, fixed=fixed), str(temp),
         str(size_bytes)],
        context,
        timeout=timeout,
    )


def create_fixed(
    path: Path,
    size_bytes: int,
    context: OperationContext,
    task_id: str | None = None,
    *,
    timeout: float | None = None,
) -> DiskInfo:
    """Create a fully allocated disk of exactly ``size_bytes`` at ``path``.

    Progress is the share of the file allocated.  Cancelable between chunks.
    """
    fmt = format_for(path)
    check_size(fmt, size_bytes)
    target = _require_new_target(path)
    deadline = _Deadline(timeout)
    with _new_output(target, _task_id(context, task_id)) as temp:
        _create_image(temp, fmt, size_bytes, True, context, deadline.remaining())
        _allocate(temp, context, _Progress(context, 2.0, 99.0), deadline)
    context.report_progress(100.0)
    return info(target)


def create_dynamic(
    path: Path,
    size_bytes: int,
    context: OperationContext,
    task_id: str | None = None,
    *,
    timeout: float | None = None,
) -> DiskInfo:
    """Create a sparse / dynamically expanding disk of exactly ``size_bytes``."""
    fmt = format_for(path)
    check_size(fmt, size_bytes)
    target = _require_new_target(path)
    with _new_output(target, _task_id(context, task_id)) as temp:
        context.report_progress(10.0)
        _create_image(temp, fmt, size_bytes, False, context, timeout)
        context.report_progress(90.0)
    context.report_progress(100.0)
    return info(target)


def create_differencing(
    path: Path,
    parent: Path,
    context: OperationContext,
    task_id: str | None = None,
    *,
    timeout: float | None = None,
) -> DiskInfo:
    """Create a qcow2 overlay at ``path`` whose backing file is ``parent`` (any format).

    The backing file is recorded relative to the overlay's directory, so a chain
    keeps working when the whole storage root moves.
    """
    if format_for(path) != "qcow2":
        raise IllegalValue(
            "A differencing disk must be a .qcow2 file: qemu can read VHD/VHDX "
            "differencing disks but cannot create them; the parent may be in any format"
        )
    parent = _require_source(parent)
    parent_fmt = format_for(parent)
    target = _require_new_target(path)
    if os.path.realpath(parent) == os.path.realpath(target):
        raise IllegalValue("A differencing disk cannot be its own parent")
    backing = os.path.relpath(parent, target.parent)
    with _new_output(target, _task_id(context, task_id)) as temp:
        context.report_progress(10.0)
        run_qemu_img(
            ["create", "-q", "-f", "qcow2", "-b", backing, "-F", parent_fmt, str(temp)],
            context,
            timeout=timeout,
        )
        context.report_progress(90.0)
    context.report_progress(100.0)
    return info(target)


def _device_size(device: Path) -> tuple[int, bool]:
    """(size in bytes, is a block device) of a host drive; DiskError/IllegalValue otherwise."""
    try:
        mode = os.stat(device).st_mode
    except FileNotFoundError as exc:
        raise DiskError(f"The host drive {device} does not exist", hresults.FILE_NOT_FOUND) from exc
    except OSError as exc:
        raise _disk_error(exc, f"Cannot examine the host drive {device}") from exc
    is_block = stat.S_ISBLK(mode)
    if not (is_block or stat.S_ISREG(mode)):
        raise IllegalValue(f"The host drive {device} is neither a block device nor a regular file")
    try:
        fd = os.open(device, os.O_RDONLY)
    except OSError as exc:
        raise _disk_error(exc, f"Cannot open the host drive {device}") from exc
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    if size <= 0:
        raise IllegalValue(f"The host drive {device} is empty")
    return size, is_block


def _host_drive_cluster_size(size: int) -> int:
    """A cluster size that keeps a raw data file's metadata near 1 MiB.

    ``data_file_raw=on`` maps every cluster up front, so with qcow2's default 64 KiB
    clusters a 1 TiB device would need 128 MiB of L2 tables; 2 MiB is qcow2's limit.
    """
    wanted = -(-size // (128 * KiB))  # 128 Ki L2 entries of 8 bytes = 1 MiB
    cluster = 64 * KiB
    while cluster < wanted and cluster < 2 * MiB:
        cluster *= 2
    return cluster


def create_host_drive(
    path: Path,
    device: Path,
    context: OperationContext,
    task_id: str | None = None,
    *,
    read_only: bool = True,
    timeout: float | None = None,
) -> DiskInfo:
    """Create a qcow2 at ``path`` bound to the host block device or file ``device``.

    See the module docstring for the two representations.  The device is never
    written while creating: qemu-img's ``create -o data_file=...`` would truncate it,
    so a read-write binding is created against a placeholder and then re-pointed
    with ``qemu-img amend``.  Which devices a producer may bind is the caller's
    policy; this function only requires an absolute path.
    """
    if format_for(path) != "qcow2":
        raise IllegalValue(
            "A host-drive disk must be a .qcow2 file: it is a qcow2 image that references "
            "the device (qemu cannot write VHD linked disks)"
        )
    device = _require_absolute(device)
    size, is_block = _device_size(device)
    check_maximum("qcow2", size)
    target = _require_new_target(path)
    deadline = _Deadline(timeout)
    job = _task_id(context, task_id)
    with _new_output(target, job) as temp:
        context.report_progress(10.0)
        if read_only:
            protocol = "host_device" if is_block else "file"
            backing = "json:" + json.dumps(
                {
                    "driver": "raw",
                    "read-only": True,
                    "file": {"driver": protocol, "filename": str(device), "read-only": True},
                },
                separators=(",", ":"),
            )
            run_qemu_img(
                ["create", "-q", "-f", "qcow2", "-b", backing, "-F", "raw", str(temp)],
                context,
                timeout=deadline.remaining(),
            )
        else:
            placeholder = temporary_path_for(target.with_name(target.name + ".data"), job)
            remove_quietly(placeholder)
            try:
                options = (
                    f"data_file={_escape_option(str(placeholder))},data_file_raw=on,"
                    f"cluster_size={_host_drive_cluster_size(size)}"
                )
                run_qemu_img(
                    ["create", "-q", "-f", "qcow2", "-o", options, str(temp), str(size)],
                    context,
                    timeout=deadline.remaining(),
                )
                context.report_progress(50.0)
                run_qemu_img(
                    [
                        "amend",
                        "-q",
                        "-f",
                        "qcow2",
                        "-o",
                        f"data_file={_escape_option(str(device))}",
                        str(temp),
                    ],
                    context,
                    timeout=deadline.remaining(),
                )
            finally:
                remove_quietly(placeholder)
        context.report_progress(90.0)
    context.report_progress(100.0)
    return info(target)


def _convert_into(
    source: Path,
    destination: Path,
    fixed: bool,
    context: OperationContext,
    task_id: str | None,
    timeout: float | None,
) -> DiskInfo:
    source = _require_source(source)
    source_fmt = format_for(source)
    destination_fmt = format_for(destination)
    target = _require_new_target(destination)
    deadline = _Deadline(timeout)
    source_info = info(source, timeout=deadline.remaining())
    check_maximum(destination_fmt, source_info.virtual_size)
    copy_end = 90.0 if fixed else 99.0
    with _new_output(target, _task_id(context, task_id)) as temp:
        run_qemu_img(
            [
                "convert",
                "-p",
                "-f",
                source_fmt,
                "-O",
                destination_fmt,
                *_create_options(destination_fmt, fixed),
                str(source),
                str(temp),
            ],
            context,
            progress_range=(0.0, copy_end),
            timeout=deadline.remaining(),
        )
        if fixed:
            _allocate(temp, context, _Progress(context, copy_end, 99.0), deadline)
    context.report_progress(100.0)
    return info(target)


def convert(
    source: Path,
    destination: Path,
    fixed: bool,
    context: OperationContext,
    task_id: str | None = None,
    *,
    timeout: float | None = None,
) -> DiskInfo:
    """Copy ``source`` into a new fixed or dynamic disk, format by ``destination``'s
    extension.  The source is only read; an existing destination is FILE_EXISTS
    before anything runs.  A differencing source is read through its whole chain."""
    return _convert_into(source, destination, fixed, context, task_id, timeout)


def merge_to(
    source: Path,
    destination: Path,
    fixed: bool,
    context: OperationContext,
    task_id: str | None = None,
    *,
    timeout: float | None = None,
) -> DiskInfo:
    """Collapse the chain ending at ``source`` into a new standalone disk."""
    return _convert_into(source, destination, fixed, context, task_id, timeout)


def compact(
    path: Path,
    context: OperationContext,
    task_id: str | None = None,
    *,
    timeout: float | None = None,
) -> DiskInfo:
    """Rewrite a dynamic or differencing disk without its unused and zeroed blocks.

    The copy is built beside the original and replaces it in one rename; replacing is
    the point here, unlike the other operations.  A differencing disk keeps its
    parent and only its own data.  If the copy would be larger, the original stays.
    """
    path = _require_source(path)
    fmt = format_for(path)
    deadline = _Deadline(timeout)
    data = _query(path, deadline.remaining())
    before = _describe(path, data)
    if before.disk_type == VMHardDiskType.HostDrive:
        raise IllegalValue("A host-drive disk holds no data of its own to compact")
    if before.disk_type == VMHardDiskType.FixedSize:
        raise IllegalValue("Only dynamic and differencing disks can be compacted")
    backing: list[str] = []
    if before.disk_type == VMHardDiskType.Differencing:
        # The stored (relative) name, so the copy's chain resolves like the original's.
        backing = [
            "-B",
            str(data["backing-filename"]),
            "-F",
            str(data.get("backing-filename-format") or format_for(before.parent or "")),
        ]
    temp = temporary_path_for(path, _task_id(context, task_id))
    remove_quietly(temp)
    try:
        run_qemu_img(
            [
                "convert",
                "-p",
                "-f",
                fmt,
                "-O",
                fmt,
                *_create_options(fmt, fixed=False),
                *backing,
                str(path),
                str(temp),
            ],
            context,
            progress_range=(0.0, 98.0),
            timeout=deadline.remaining(),
        )
        if context.cancel_requested():
            raise Cancelled()
        if os.stat(temp).st_blocks * 512 < os.stat(path).st_blocks * 512:
            shutil.copymode(path, temp)
            _fsync(temp)
            os.replace(temp, path)
            _fsync_directory(path.parent)
    finally:
        remove_quietly(temp)
    context.report_progress(100.0)
    return info(path)


def merge(
    path: Path,
    context: OperationContext,
    task_id: str | None = None,
    *,
    timeout: float | None = None,
) -> DiskInfo:
    """Commit the differencing disk ``path`` into its parent (``qemu-img commit -p``).

    Not cancelable: the parent is modified in place, and stopping halfway would leave
    it neither old nor new.  (If the worker dies anyway, the overlay still holds all
    its data, because qemu-img empties it only after the commit completed, so running
    the merge again finishes the job.)  Afterwards ``path`` is an empty overlay, so
    its contents equal the parent's.  A parent shared by other differencing disks is
    changed under them too, as with any merge.  ``timeout`` still kills qemu-img.
    Returns the parent's info.
    """
    del task_id  # in place by definition: there is no temporary file
    path = _require_source(path)
    fmt = format_for(path)
    disk = info(path)
    if disk.disk_type != VMHardDiskType.Differencing or disk.parent is None:
        raise IllegalValue(f"{path} is not a differencing disk, so it has no parent to merge into")
    context.report_progress(1.0)
    run_qemu_img(
        ["commit", "-p", "-f", fmt, str(path)],
        context,
        progress_range=(1.0, 99.0),
        timeout=timeout,
        cancelable=False,
    )
    context.report_progress(100.0)
    return info(Path(disk.parent))
