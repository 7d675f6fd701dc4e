"""Disk formats by file extension and their size limits: the one table both sides use.

Producers check extensions and sizes before queueing; the worker's engines use
the same table.  `FormatError` is neutral: each side turns it into its own kind
of failure (`errors.InvalidArgumentError` before queueing, IllegalValue in a task).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePath

KiB = 1 << 10
MiB = 1 << 20
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

# What a person calls each qemu format.
FORMAT_NAMES: Mapping[str, str] = {
    "vpc": "VHD",
    "vhdx": "VHDX",
    "qcow2": "qcow2",
    "raw": "raw",
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


class FormatError(ValueError):
    """An extension or size that no supported format accepts."""


def format_for_name(path: str | PurePath) -> str:
    """The qemu format for a disk path, from its extension; never probed."""
    suffix = PurePath(path).suffix.lower()
    fmt = FORMAT_BY_EXTENSION.get(suffix)
    if fmt is None:
        raise FormatError(
            f"Unsupported disk file extension {suffix or '(none)'!r} in {str(path)!r}; "
            f"use one of {', '.join(FORMAT_BY_EXTENSION)}"
        )
    return fmt


def human_size(size: int) -> str:
    for unit, name in ((PiB, "PiB"), (TiB, "TiB"), (GiB, "GiB"), (MiB, "MiB")):
        if size >= unit and size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size} bytes"


def check_maximum(fmt: str, size_bytes: int) -> None:
    """`FormatError` when ``size_bytes`` is beyond what format ``fmt`` can hold."""
    maximum = MAX_SIZE_BYTES.get(fmt)
    if maximum is None:
        raise FormatError(f"Unsupported disk format {fmt!r}")
    if size_bytes > maximum:
        raise FormatError(
            f"{human_size(size_bytes)} is beyond the {human_size(maximum)} maximum "
            f"of {FORMAT_NAMES[fmt]} disks"
        )
