"""Image information: `DiskInfo` and `info`, from ``qemu-img info`` and the headers.

The disk type comes from what qemu-img reports (backing file, external data file)
and, for VHD and VHDX, from the image's own header (`headers`).  A host-drive disk
is recognised by its raw external data file (read-write) or by a ``json:`` backing
filename naming the device (read-only).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from api.enums import VMHardDiskType
from api.protocol import hresults
from workers.engines.context import NullContext
from workers.engines.qemu_img.headers import vhd_disk_type, vhdx_file_flags
from workers.engines.qemu_img.pinned import PinnedChain
from workers.engines.qemu_img.runner import run_qemu_img
from workers.engines.qemu_img.sizes import format_for
from workers.failures import DiskError, OperationFailed


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
    backing_name: str | None = None
    """The backing file name exactly as the image stores it (absolute, relative,
    ``json:`` or another protocol); a caller confines it before anything opens it."""

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["disk_type"] = int(self.disk_type)
        return data


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


def has_protocol(name: str) -> bool:
    """Whether qemu reads ``name`` as ``protocol:...`` rather than a file name
    (qemu's own rule: a ':' before any '/')."""
    colon = name.find(":")
    slash = name.find("/")
    return colon >= 0 and (slash < 0 or colon < slash)


def _absolute_beside(image: Path, name: str) -> str:
    """A backing or data file name as qemu resolves it: relative to the image's directory."""
    return os.path.normpath(os.path.join(image.parent, name))


def query(
    path: Path,
    timeout: float | None,
    *,
    opened: str | None = None,
    pass_fds: Sequence[int] = (),
) -> dict[str, Any]:
    """The raw ``qemu-img info --output=json`` of one image (not its backing chain).

    ``opened`` is what qemu-img opens instead of ``path`` (a `PinnedChain` header
    spec over a descriptor in ``pass_fds``); ``path`` still gives the format.
    """
    fmt = format_for(path)
    if opened is None and not os.path.lexists(path):
        raise DiskError(f"{path} does not exist", hresults.FILE_NOT_FOUND)
    # -U: reading the header of a disk that a running VM holds open is harmless, and
    # without it qemu-img refuses for the VM's write lock.
    output = run_qemu_img(
        ["info", "--output=json", "-U", "-f", fmt, opened or str(path)],
        NullContext("internal"),
        timeout=timeout,
        pass_fds=pass_fds,
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


def _raw_file_query(opened: str) -> dict[str, Any] | None:
    """What ``qemu-img info -f raw`` reports of a regular file, read with one stat.

    A raw file has no header, so qemu-img learns nothing a stat does not, and the
    process it costs (several ms) is most of a small operation's fixed cost.  qemu
    counts whole 512-byte sectors; a device or anything unusual still goes to qemu.
    """
    try:
        found = os.stat(opened)
    except OSError:
        return None
    if not stat.S_ISREG(found.st_mode):
        return None
    return {"virtual-size": -(-found.st_size // 512) * 512,
            "actual-size": found.st_blocks * 512}


def written_info(path: Path, virtual_size: int) -> DiskInfo:
    """The `DiskInfo` of a standalone qcow2 or raw image this worker has just written
    with ``virtual_size``, without running ``qemu-img info`` again: for these formats
    the disk type follows from the sizes alone, and qemu's actual size is the file's
    allocated blocks.  Other formats keep their type in a header: `info` reads them.
    """
    if format_for(path) not in ("qcow2", "raw"):
        return info(path)
    return describe(path, {"virtual-size": virtual_size,
                           "actual-size": os.stat(path).st_blocks * 512})


def info(
    path: Path,
    *,
    timeout: float | None = 60.0,
    opened: PinnedChain | None = None,
) -> DiskInfo:
    """Describe the image at ``path`` (``qemu-img info --output=json -f <fmt>``).

    With ``opened`` (a chain whose first image is ``path``, opened by the caller)
    qemu-img and the header parsers read that descriptor, never the name.
    """
    path = Path(path)
    if opened is None:
        return describe(path, query(path, timeout))
    head = opened.images[0]
    if head.format == "raw" and head.data_file is None:
        raw = _raw_file_query(head.filename)
        if raw is not None:
            return describe(path, raw)
    data = query(path, timeout, opened=opened.header_spec(), pass_fds=opened.fds)
    return describe(path, data, header=Path(opened.images[0].filename))


def describe(path: Path, data: dict[str, Any], *, header: Path | None = None) -> DiskInfo:
    """The `DiskInfo` of the image at ``path`` whose ``qemu-img info`` output is ``data``.

    ``header`` is where to read the VHD/VHDX header, when not from ``path``.
    """
    fmt = format_for(path)
    header = header or path
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
        found = vhd_disk_type(header)
        if found is None:
            # qemu only reports a block size for dynamic VHDs.
            found = VMHardDiskType.Dynamic if "cluster-size" in data else VMHardDiskType.FixedSize
        disk_type = found
    elif fmt == "vhdx":
        flags = vhdx_file_flags(header)
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
        backing_name=backing if isinstance(backing, str) and backing else None,
    )
