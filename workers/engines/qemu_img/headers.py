"""VHD and VHDX header parsing: the disk type that qemu-img info does not report.

Both readers are best effort: a file that cannot be read or does not look like the
format gives None, and the caller falls back to what qemu-img said.
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
