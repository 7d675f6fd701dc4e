"""The disk engine: every disk operation on real image files, done by ``qemu-img``.

This package re-exports the engine's public names; each concept lives in its module:

============== ====================================================================
`sizes`        formats by extension, size limits (`format_for`, `check_size`)
`headers`      VHD/VHDX header parsing for the disk type qemu-img does not report,
               and a qcow2's external data file name, read before any qemu opens it
`info`         `DiskInfo` and `info`: what an image is
`errors`       qemu-img stderr and OSErrors mapped onto vmtask failures
`runner`       `run_qemu_img`: the child process, cancel, deadline, progress
`outputs`      checked paths; new images built under a temporary, published durably
`create`       `create_fixed`, `create_dynamic`, `create_differencing`,
               `create_host_drive`
`rewrite`      `convert`, `merge_to`, `compact`, `merge`
`transfer`     `pull`: a new image read from another host's NBD export
============== ====================================================================

Formats are always passed to qemu-img explicitly, never probed (see `sizes`).
Every operation that produces a file builds it under a temporary name beside the
target and publishes it only on success (see `outputs`).  Host-drive disks are
described in `create`.
"""

from workers.engines.qemu_img.create import (
    create_differencing,
    create_dynamic,
    create_fixed,
    create_host_drive,
)
from workers.engines.qemu_img.errors import failure_from_stderr
from workers.engines.qemu_img.headers import qcow2_data_file
from workers.engines.qemu_img.info import DiskInfo, info
from workers.engines.qemu_img.outputs import ALLOCATION_CHUNK
from workers.engines.qemu_img.resize import RESIZABLE_FORMATS, grow
from workers.engines.qemu_img.rewrite import compact, convert, merge, merge_to
from workers.engines.qemu_img.runner import KILL_GRACE, POLL_INTERVAL, run_qemu_img
from workers.engines.qemu_img.sizes import (
    FORMAT_BY_EXTENSION,
    FORMAT_NAMES,
    MAX_SIZE_BYTES,
    SECTOR,
    GiB,
    KiB,
    MiB,
    PiB,
    TiB,
    check_maximum,
    check_size,
    format_for,
)
from workers.engines.qemu_img.transfer import pull

__all__ = [
    "ALLOCATION_CHUNK",
    "FORMAT_BY_EXTENSION",
    "FORMAT_NAMES",
    "KILL_GRACE",
    "MAX_SIZE_BYTES",
    "POLL_INTERVAL",
    "RESIZABLE_FORMATS",
    "SECTOR",
    "DiskInfo",
    "GiB",
    "KiB",
    "MiB",
    "PiB",
    "TiB",
    "check_maximum",
    "check_size",
    "compact",
    "convert",
    "create_differencing",
    "create_dynamic",
    "create_fixed",
    "create_host_drive",
    "failure_from_stderr",
    "format_for",
    "grow",
    "info",
    "merge",
    "merge_to",
    "pull",
    "qcow2_data_file",
    "run_qemu_img",
]
