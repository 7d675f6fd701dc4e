"""Growing a disk in place (``qemu-img resize``).

Only growing: shrinking cuts off whatever the guest stored at the end.  QEMU can
resize qcow2 and raw images only; VHD and VHDX must be converted first.  A fixed
(raw) disk stays fully allocated.  Given the disk's checked chain (`PinnedChain`),
qemu-img opens exactly those files by descriptor and no name written in the image.
"""

from __future__ import annotations

from pathlib import Path

from api.enums import VMHardDiskType
from workers.engines.context import OperationContext
from workers.engines.qemu_img.info import DiskInfo, info
from workers.engines.qemu_img.outputs import require_source
from workers.engines.qemu_img.pinned import PinnedChain
from workers.engines.qemu_img.runner import run_qemu_img
from workers.engines.qemu_img.sizes import check_maximum, format_for
from workers.failures import IllegalValue

RESIZABLE_FORMATS = ("qcow2", "raw")


def grow(path: Path, size_bytes: int, context: OperationContext, *,
         chain: PinnedChain | None = None) -> DiskInfo:
    source = require_source(path)
    fmt = format_for(source)
    if fmt not in RESIZABLE_FORMATS:
        raise IllegalValue(f"QEMU cannot resize {fmt} images ({source.name}); "
                           "convert the disk to qcow2 first")
    current = info(source, opened=chain)
    if size_bytes <= current.virtual_size:
        raise IllegalValue(f"{source.name} is {current.virtual_size} bytes: resize only grows "
                           f"a disk, not to {size_bytes}")
    check_maximum(fmt, size_bytes)
    options = []
    if current.disk_type is VMHardDiskType.FixedSize and fmt == "raw":
        options = ["--preallocation=falloc"]
    # In place: stopping halfway would leave a half-grown image, so not cancelable.
    run_qemu_img(["resize", "-f", fmt, *options, str(source) if chain is None else chain.spec(),
                  str(size_bytes)], context, cancelable=False,
                 pass_fds=() if chain is None else chain.fds)
    return info(source, opened=chain)
