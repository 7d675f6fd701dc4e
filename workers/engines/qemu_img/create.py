"""Creating disks: fixed, dynamic, differencing and host-drive images.

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
import stat
from pathlib import Path

from api.protocol import hresults
from workers.engines.context import OperationContext, ProgressSpan
from workers.engines.qemu_img.errors import disk_error
from workers.engines.qemu_img.info import DiskInfo, info
from workers.engines.qemu_img.outputs import (
    allocate,
    create_options,
    new_output,
    require_absolute,
    require_new_target,
    require_source,
)
from workers.engines.qemu_img.runner import Deadline, run_qemu_img
from workers.engines.qemu_img.sizes import KiB, MiB, check_maximum, check_size, format_for
from workers.engines.storage import remove_quietly, temporary_path_for
from workers.failures import DiskError, IllegalValue


def _escape_option(value: str) -> str:
    # qemu's -o parser treats "," as a separator and ",," as a literal comma.
    return value.replace(",", ",,")

def _create_image(
    temp: Path,
    fmt: str,
    size_bytes: int,
    fixed: bool,
    context: OperationContext,
    timeout: float | None,
) -> None:
    run_qemu_img(
        ["create", "-q", "-f", fmt, *create_options(fmt, fixed=fixed), str(temp),
         str(size_bytes)],
        context,
        timeout=timeout,
    )


def create_fixed(
    path: Path,
    size_bytes: int,
    context: OperationContext,
    *,
    timeout: float | None = None,
) -> DiskInfo:
    """Create a fully allocated disk of exactly ``size_bytes`` at ``path``.

    Progress is the share of the file allocated.  Cancelable between chunks.
    """
    fmt = format_for(path)
    check_size(fmt, size_bytes)
    target = require_new_target(path)
    deadline = Deadline(timeout)
    with new_output(target, context.task_id) as temp:
        _create_image(temp, fmt, size_bytes, True, context, deadline.remaining())
        allocate(temp, context, ProgressSpan(context, 2.0, 99.0), deadline)
    context.report_progress(100.0)
    return info(target)


def create_dynamic(
    path: Path,
    size_bytes: int,
    context: OperationContext,
    *,
    timeout: float | None = None,
) -> DiskInfo:
    """Create a sparse / dynamically expanding disk of exactly ``size_bytes``."""
    fmt = format_for(path)
    check_size(fmt, size_bytes)
    target = require_new_target(path)
    with new_output(target, context.task_id) as temp:
        context.log(f"phase: create a dynamic {fmt} image of {size_bytes} bytes as {temp.name}")
        context.report_progress(10.0)
        _create_image(temp, fmt, size_bytes, False, context, timeout)
        context.report_progress(90.0)
        context.log(f"phase: publish {target}")
    context.report_progress(100.0)
    return info(target)


def create_differencing(
    path: Path,
    parent: Path,
    context: OperationContext,
    *,
    timeout: float | None = None,
    parent_info: DiskInfo | None = None,
) -> DiskInfo:
    """Create a qcow2 overlay at ``path`` whose backing file is ``parent`` (any format).

    The backing file is recorded relative to the overlay's directory, so a chain
    keeps working when the whole storage root moves.  qemu-img never opens the
    parent (``-u``): a plain ``create -b`` would open it, and its whole backing
    chain, by the names written in the images.  The overlay's size is the parent's
    virtual size from ``parent_info``, which a caller that checked and opened the
    parent's chain by descriptor passes; without it the parent's header is read.
    """
    if format_for(path) != "qcow2":
        raise IllegalValue(
            "A differencing disk must be a .qcow2 file: qemu can read VHD/VHDX "
            "differencing disks but cannot create them; the parent may be in any format"
        )
    parent = require_source(parent)
    parent_fmt = format_for(parent)
    target = require_new_target(path)
    if os.path.realpath(parent) == os.path.realpath(target):
        raise IllegalValue("A differencing disk cannot be its own parent")
    size = (parent_info or info(parent, timeout=timeout)).virtual_size
    backing = os.path.relpath(parent, target.parent)
    with new_output(target, context.task_id) as temp:
        context.log(f"phase: create a qcow2 overlay of {parent} ({parent_fmt}, {size} bytes)")
        context.report_progress(10.0)
        run_qemu_img(
            ["create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", parent_fmt, str(temp),
             str(size)],
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
        raise disk_error(exc, f"Cannot examine the host drive {device}") from exc
    is_block = stat.S_ISBLK(mode)
    if not (is_block or stat.S_ISREG(mode)):
        raise IllegalValue(f"The host drive {device} is neither a block device nor a regular file")
    try:
        fd = os.open(device, os.O_RDONLY)
    except OSError as exc:
        raise disk_error(exc, f"Cannot open the host drive {device}") from exc
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
    device = require_absolute(device)
    size, is_block = _device_size(device)
    check_maximum("qcow2", size)
    target = require_new_target(path)
    deadline = Deadline(timeout)
    job = context.task_id
    with new_output(target, job) as temp:
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

