"""Rewriting existing disks: convert and merge_to into a new disk, compact, merge.

`convert` and `merge_to` read a source (through its whole chain) into a new
standalone disk; `compact` rebuilds a dynamic or differencing disk beside itself and
replaces it; `merge` commits a differencing disk into its parent in place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from api.enums import VMHardDiskType
from workers.engines.context import OperationContext, ProgressSpan, raise_if_cancelled
from workers.engines.qemu_img.info import DiskInfo, describe, info, query, written_info
from workers.engines.qemu_img.outputs import (
    allocate,
    create_options,
    fsync_file,
    new_output,
    require_new_target,
    require_source,
)
from workers.engines.qemu_img.pinned import PinnedChain
from workers.engines.qemu_img.runner import Deadline, run_qemu_img
from workers.engines.qemu_img.sizes import check_maximum, format_for
from workers.engines.storage import fsync_directory, remove_quietly, temporary_path_for
from workers.failures import IllegalValue


def _convert_into(
    source: Path,
    destination: Path,
    fixed: bool,
    context: OperationContext,
    timeout: float | None,
    chain: PinnedChain | None,
    source_info: DiskInfo | None = None,
) -> DiskInfo:
    source = require_source(source) if chain is None else source
    source_fmt = format_for(source)
    destination_fmt = format_for(destination)
    target = require_new_target(destination)
    deadline = Deadline(timeout)
    if source_info is None:  # a caller that opened the chain already knows it
        source_info = info(source, timeout=deadline.remaining(), opened=chain)
    check_maximum(destination_fmt, source_info.virtual_size)
    copy_end = 90.0 if fixed else 99.0
    with new_output(target, context.task_id) as temp:
        context.log(f"phase: copy {source.name} ({source_fmt}, {source_info.virtual_size} "
                    f"bytes) into a {'fixed' if fixed else 'dynamic'} {destination_fmt} "
                    f"image {temp.name}")
        run_qemu_img(
            [
                "convert",
                "-p",
                "-f",
                source_fmt,
                "-O",
                destination_fmt,
                *create_options(destination_fmt, fixed),
                str(source) if chain is None else chain.spec(),
                str(temp),
            ],
            context,
            progress_range=(0.0, copy_end),
            timeout=deadline.remaining(),
            pass_fds=() if chain is None else chain.fds,
        )
        if fixed:
            context.log("phase: allocate every block (a fixed disk)")
            allocate(temp, context, ProgressSpan(context, copy_end, 99.0), deadline)
        context.log(f"phase: publish {target}")
    context.report_progress(100.0)
    return written_info(target, source_info.virtual_size)


def convert(
    source: Path,
    destination: Path,
    fixed: bool,
    context: OperationContext,
    *,
    timeout: float | None = None,
    chain: PinnedChain | None = None,
    source_info: DiskInfo | None = None,
) -> DiskInfo:
    """Copy ``source`` into a new fixed or dynamic disk, format by ``destination``'s
    extension.  The source is only read; an existing destination is FILE_EXISTS
    before anything runs.  A differencing source is read through its whole chain:
    ``chain`` when given (qemu then follows no name stored in the images), else the
    backing names the images record."""
    return _convert_into(source, destination, fixed, context, timeout, chain,
                         source_info)


def merge_to(
    source: Path,
    destination: Path,
    fixed: bool,
    context: OperationContext,
    *,
    timeout: float | None = None,
    chain: PinnedChain | None = None,
    source_info: DiskInfo | None = None,
) -> DiskInfo:
    """Collapse the chain ending at ``source`` into a new standalone disk."""
    return _convert_into(source, destination, fixed, context, timeout, chain,
                         source_info)


def compact(
    path: Path,
    context: OperationContext,
    *,
    timeout: float | None = None,
    chain: PinnedChain | None = None,
) -> DiskInfo:
    """Rewrite a dynamic or differencing disk without its unused and zeroed blocks.

    The copy is built beside the original and replaces it in one rename; replacing is
    the point here, unlike the other operations.  A differencing disk keeps its
    parent and only its own data.  If the copy would be larger, the original stays.
    """
    path = require_source(path)
    fmt = format_for(path)
    deadline = Deadline(timeout)
    if chain is None:
        data = query(path, deadline.remaining())
        before = describe(path, data)
    else:
        data = query(path, deadline.remaining(), opened=chain.header_spec(),
                     pass_fds=chain.fds)
        before = describe(path, data, header=Path(chain.images[0].filename))
    if before.disk_type == VMHardDiskType.HostDrive:
        raise IllegalValue("A host-drive disk holds no data of its own to compact")
    if before.disk_type == VMHardDiskType.FixedSize:
        raise IllegalValue("Only dynamic and differencing disks can be compacted")
    backing: list[str] = []
    rename_backing: list[str] = []
    if before.disk_type == VMHardDiskType.Differencing:
        # The copy must name the stored (relative) name, so its chain resolves like the
        # original's.  qemu-img convert opens the backing it writes: given a checked
        # chain, it gets the checked parent alone by descriptor, and the stored name
        # is written afterwards without opening anything (rebase -u).
        stored = str(data["backing-filename"])
        parent_fmt = str(data.get("backing-filename-format") or format_for(before.parent or ""))
        if chain is not None and len(chain.images) > 1:
            backing = ["-B", PinnedChain(chain.images[1:2]).spec(), "-F", parent_fmt]
            rename_backing = ["rebase", "-q", "-u", "-f", fmt, "-b", stored, "-F", parent_fmt]
        else:
            backing = ["-B", stored, "-F", parent_fmt]
    temp = temporary_path_for(path, context.task_id)
    remove_quietly(temp)
    try:
        run_qemu_img(
            [
                "convert",
                "-p",
                "-f",
                fmt,
                "-O",
                fmt,
                *create_options(fmt, fixed=False),
                *backing,
                str(path) if chain is None else chain.spec(),
                str(temp),
            ],
            context,
            progress_range=(0.0, 98.0),
            timeout=deadline.remaining(),
            pass_fds=() if chain is None else chain.fds,
        )
        raise_if_cancelled(context)
        if rename_backing:
            run_qemu_img([*rename_backing, str(temp)], context, timeout=deadline.remaining())
        if os.stat(temp).st_blocks * 512 < os.stat(path).st_blocks * 512:
            shutil.copymode(path, temp)
            fsync_file(temp)
            os.replace(temp, path)
            fsync_directory(path.parent)
    finally:
        remove_quietly(temp)
    context.report_progress(100.0)
    return info(path)


def merge(
    path: Path,
    context: OperationContext,
    *,
    timeout: float | None = None,
    chain: PinnedChain | None = None,
) -> DiskInfo:
    """Commit the differencing disk ``path`` into its parent (``qemu-img commit -p``).

    Not cancelable: the parent is modified in place, and stopping halfway would leave
    it neither old nor new.  (If the worker dies anyway, the overlay still holds all
    its data, because qemu-img empties it only after the commit completed, so running
    the merge again finishes the job.)  Afterwards ``path`` is an empty overlay, so
    its contents equal the parent's.  A parent shared by other differencing disks is
    changed under them too, as with any merge.  ``timeout`` still kills qemu-img.
    With ``chain`` (``path`` and its checked parents) qemu writes into exactly that
    parent, whatever the overlay names.  Returns the parent's info.
    """
    path = require_source(path)
    fmt = format_for(path)
    disk = info(path, opened=chain)
    if disk.disk_type != VMHardDiskType.Differencing or disk.parent is None:
        raise IllegalValue(f"{path} is not a differencing disk, so it has no parent to merge into")
    if chain is not None and len(chain.images) < 2:
        raise IllegalValue(f"{path}: the chain given to merge has no parent")
    context.report_progress(1.0)
    run_qemu_img(
        ["commit", "-p", "-f", fmt, str(path) if chain is None else chain.spec()],
        context,
        progress_range=(1.0, 99.0),
        timeout=timeout,
        cancelable=False,
        pass_fds=() if chain is None else chain.fds,
    )
    context.report_progress(100.0)
    if chain is None:
        return info(Path(disk.parent))
    parent = PinnedChain(chain.images[1:], chain.fds, chain.tail)
    return info(Path(disk.parent), opened=parent)
