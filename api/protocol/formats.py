"""Disk formats by file extension and their size limits: shared by both sides.

Producers check these before queueing; the worker's disk engine uses the same table.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePosixPath

from api.errors import InvalidArgumentError

GiB = 1 << 30
TiB = 1 << 40
PiB = 1 << 50

FORMAT_BY_EXTENSION: Mapping[str, str] = {
    ".vhd": "vpc",
    ".vhdx": "vhdx",
    ".qcow2": "qcow2",
    ".img": "raw",
    ".raw": "raw",
}

# vpc: qemu's VHD_MAX_SECTORS (0xff000000 sectors).  vhdx: the specification's 64 TiB.
# qcow2: qemu 7.2 refuses a little under 2 PiB with the default 64 KiB clusters.
# raw: the filesystem decides (ext4 stops at 16 TiB).
MAX_SIZE_BYTES: Mapping[str, int] = {
    "vpc": 2040 * GiB,
    "vhdx": 64 * TiB,
    "qcow2": 1 * PiB,
    "raw": 1 * PiB,
}


def check_relative_path(path: str, what: str = "path") -> str:
    """A producer-side check: a relative path with no '..', inside the storage root.

    The worker re-resolves it against the real root, symlinks included.
    """
    if not isinstance(path, str) or not path.strip() or "\x00" in path:
        raise InvalidArgumentError(f"{what} must be a non-empty path, not {path!r}")
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts:
        raise InvalidArgumentError(
            f"{what} {path!r} must be relative to the storage root, without '..'"
        )
    return path


def format_for_name(path: str) -> str:
    suffix = PurePosixPath(path).suffix.lower()
    fmt = FORMAT_BY_EXTENSION.get(suffix)
    if fmt is None:
        raise InvalidArgumentError(
            f"Unsupported disk file extension {suffix or '(none)'!r} in {path!r}; "
            f"use one of {', '.join(FORMAT_BY_EXTENSION)}"
        )
    return fmt


def check_size_bytes(path: str, size_bytes: int) -> None:
    fmt = format_for_name(path)
    if size_bytes <= 0:
        raise InvalidArgumentError(f"A disk size must be positive, not {size_bytes} bytes")
    if size_bytes > MAX_SIZE_BYTES[fmt]:
        raise InvalidArgumentError(
            f"{size_bytes // GiB} GiB is beyond the maximum of {fmt} disks "
            f"({MAX_SIZE_BYTES[fmt] // GiB} GiB)"
        )
