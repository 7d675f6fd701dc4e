"""A backing chain handed to qemu whole, so qemu follows no name written in an image.

By default qemu opens an image's backing file (and a qcow2's external data file) by
the name stored in the image: absolute, relative, or a protocol such as ``nbd:`` or
``json:{...}``.  A planted image could so steer qemu anywhere.  A `PinnedChain` is a
chain the caller has already checked: its ``json:`` `spec` names every image, data
file and the end of the chain explicitly (``"backing": null``), by the
``/proc/self/fd/N`` names of descriptors the caller opened, so qemu opens exactly
those files and nothing else.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PinnedImage:
    format: str
    filename: str
    """What qemu opens: normally ``/proc/self/fd/N``."""
    data_file: dict[str, Any] | None = None
    """A qcow2's external data file, as a blockdev spec (see `device_spec`)."""


@dataclass(frozen=True)
class PinnedChain:
    images: tuple[PinnedImage, ...]
    """Nearest first."""
    fds: tuple[int, ...] = ()
    """Descriptors the child must inherit (``pass_fds``)."""
    tail: dict[str, Any] | None = field(default=None)
    """The backing of the last image when it is a host drive's device, else none."""

    def node(self, start: int = 0) -> dict[str, Any]:
        """The blockdev options of the chain from image ``start`` on."""
        below: dict[str, Any] | None = self.tail
        for image in reversed(self.images[start:]):
            options: dict[str, Any] = {
                "driver": image.format,
                "file": {"driver": "file", "filename": image.filename},
            }
            if image.format == "qcow2":
                # Only qcow2 takes a backing; null means "none", not "what the header says".
                options["backing"] = below
                if image.data_file is not None:
                    options["data-file"] = image.data_file
            below = options
        assert below is not None
        return below

    def spec(self, start: int = 0) -> str:
        return "json:" + json.dumps(self.node(start), separators=(",", ":"))

    def header_spec(self) -> str:
        """The first image alone, for ``qemu-img info`` (which never opens a backing)."""
        image = self.images[0]
        options: dict[str, Any] = {
            "driver": image.format,
            "file": {"driver": "file", "filename": image.filename},
        }
        if image.data_file is not None:
            options["data-file"] = image.data_file
        return "json:" + json.dumps(options, separators=(",", ":"))


def device_spec(device: str, *, read_only: bool) -> dict[str, Any]:
    """A raw view of a host drive (block device or file) for a backing or data file."""
    try:
        is_block = stat.S_ISBLK(os.stat(device).st_mode)
    except OSError:
        is_block = False
    protocol: dict[str, Any] = {
        "driver": "host_device" if is_block else "file", "filename": device}
    if read_only:
        protocol["read-only"] = True
        return {"driver": "raw", "read-only": True, "file": protocol}
    return protocol


def single(format_name: str, filename: str, fds: Sequence[int] = ()) -> PinnedChain:
    return PinnedChain((PinnedImage(format_name, filename),), tuple(fds))
