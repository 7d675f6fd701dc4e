"""Disk formats and sizes: which qemu format a path has, and which sizes it can hold.

Formats follow the file extension and are always passed to qemu-img explicitly
(``-f``/``-O``/``-F``): an image is never probed, so a guest cannot make a raw disk
look like a qcow2 with a backing file of its choosing.

======== ========= ================================================================
suffix   format    notes
======== ========= ================================================================
.vhd     vpc       ``force_size=on`` always, so the exact byte size is kept
.vhdx    vhdx
.qcow2   qcow2     the only format qemu can write differencing and host-drive disks in
.img     raw
.raw     raw
======== ========= ================================================================

The tables live in `api.protocol.formats`, shared with producers, which check sizes
and extensions before queueing; this module turns their errors into `IllegalValue`.
Plain data, cheap to import.
"""

from __future__ import annotations

import os

from api.protocol import formats
from workers.failures import IllegalValue

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
