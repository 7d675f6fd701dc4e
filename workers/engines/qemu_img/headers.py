"""Image header parsing: what qemu-img info does not report, or must not find first.

VHD and VHDX: the disk type.  qcow2: the external data file name, which must be
confined before any qemu process opens the image (`qcow2_data_file`).  Every reader
is best effort: a file that cannot be read or does not look like the format gives
None, and the caller falls back to what qemu-img says.
"""

from __future__ import annotations

import os
import struct
import uuid
from pathlib import Path
from typing import BinaryIO, NamedTuple

from api.enums import VMHardDiskType
from workers.engines.qemu_img.sizes import KiB

_VHD_COOKIE = b"conectix"
_VHD_TYPES = {
    2: VMHardDiskType.FixedSize,
    3: VMHardDiskType.Dynamic,
    4: VMHardDiskType.Differencing,
}


def vhd_disk_type(path: Path) -> VMHardDiskType | None:
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


class _VhdxTable(NamedTuple):
    """Where a VHDX table keeps its signature, its entry count and its 32-byte entries."""

    signature: bytes
    count_format: str
    count_offset: int
    entries_offset: int


_VHDX_REGION_TABLE = _VhdxTable(b"regi", "<I", 8, 16)
_VHDX_METADATA_TABLE = _VhdxTable(b"metadata", "<H", 10, 32)


def _vhdx_entry(handle: BinaryIO, offset: int, layout: _VhdxTable, guid: bytes) -> bytes | None:
    """The first entry that ``guid`` opens in the table at ``offset``, else None."""
    handle.seek(offset)
    table = handle.read(64 * KiB)
    if table[: len(layout.signature)] != layout.signature:
        return None
    (count,) = struct.unpack_from(layout.count_format, table, layout.count_offset)
    for index in range(min(count, 2047)):
        start = layout.entries_offset + 32 * index
        entry = table[start : start + 32]
        if entry[:16] == guid:
            return entry
    return None


def vhdx_file_flags(path: Path) -> int | None:
    """The File Parameters flags of a VHDX (bit 0: LeaveBlocksAllocated, i.e. fixed;
    bit 1: HasParent), read from the first region table and the metadata table."""
    try:
        with open(path, "rb") as handle:
            if handle.read(8) != b"vhdxfile":
                return None
            region = _vhdx_entry(
                handle, _VHDX_REGION_TABLE_OFFSET, _VHDX_REGION_TABLE, _VHDX_METADATA_REGION
            )
            if region is None:
                return None
            (metadata_offset,) = struct.unpack_from("<Q", region, 16)
            item = _vhdx_entry(handle, metadata_offset, _VHDX_METADATA_TABLE, _VHDX_FILE_PARAMETERS)
            if item is None:
                return None
            (item_offset,) = struct.unpack_from("<I", item, 16)
            handle.seek(metadata_offset + item_offset)
            _block_size, flags = struct.unpack("<II", handle.read(8))
            return int(flags)
    except (OSError, struct.error):
        return None


_QCOW2_MAGIC = b"QFI\xfb"
_QCOW2_INCOMPAT_DATA_FILE = 1 << 2
_QCOW2_EXT_DATA_FILE = 0x44415441  # "DATA"
_QCOW2_MAX_HEADER = 2 * 1024 * KiB  # extensions live in the first cluster (at most 2 MiB)


def qcow2_data_file(fd: int) -> str | None:
    """The external data file name that qemu would open for the qcow2 open as ``fd``.

    qemu opens a data file only when the header's incompatible feature bit 2 is set,
    by the name in the header extension 0x44415441 (docs/interop/qcow2.txt); read
    here first, so the name is confined before any qemu process sees the image.
    None: no data file (a set bit without a name makes qemu refuse the image).
    """
    try:
        head = os.pread(fd, 104, 0)
        if head[:4] != _QCOW2_MAGIC:
            return None
        version, cluster_bits = struct.unpack_from(">I12xI", head, 4)
        if version < 3:  # version 2 has no incompatible features
            return None
        (incompatible,) = struct.unpack_from(">Q", head, 72)
        if not incompatible & _QCOW2_INCOMPAT_DATA_FILE:
            return None
        (offset,) = struct.unpack_from(">I", head, 100)
        cluster = os.pread(fd, min(1 << min(cluster_bits, 21), _QCOW2_MAX_HEADER), 0)
        while offset + 8 <= len(cluster):
            kind, length = struct.unpack_from(">II", cluster, offset)
            if kind == 0:
                return None
            if kind == _QCOW2_EXT_DATA_FILE:
                return os.fsdecode(cluster[offset + 8 : offset + 8 + length])
            offset += 8 + (length + 7) // 8 * 8
    except (OSError, struct.error):
        return None
    return None
