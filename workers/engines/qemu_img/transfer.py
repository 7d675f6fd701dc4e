"""Pulling an image from another host: ``qemu-img convert`` from an NBD export.

The source is whatever the other host serves (`workers.engines.nbd`): the raw
guest view of a disk, or a file's own bytes.  The output is built under a
temporary name and published only on success, like every other new image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from workers.engines.context import OperationContext, ProgressSpan
from workers.engines.qemu_img.info import DiskInfo, info
from workers.engines.qemu_img.outputs import (
    allocate,
    create_options,
    new_output,
    require_new_target,
)
from workers.engines.qemu_img.runner import Deadline, Stall, run_qemu_img
from workers.engines.qemu_img.sizes import check_maximum, format_for


def pull(
    source_spec: str,
    destination: Path,
    context: OperationContext,
    *,
    virtual_size: int,
    fixed: bool = False,
    verbatim: bool = False,
    timeout: float | None = None,
    stall_seconds: float | None = None,
    objects: Sequence[str] = (),
) -> DiskInfo | None:
    """Read ``source_spec`` (raw, e.g. `workers.engines.nbd.client_spec`) into the new
    image ``destination``.

    Normally the destination's format comes from its extension, fixed or dynamic as
    asked.  With ``verbatim`` the source is a file's bytes and is written as they are
    (a qcow2 overlay stays the same overlay, naming the same parent); holes stay holes,
    and nothing is returned: the file need not be an image (a VM's saved state).
    With ``stall_seconds``, a pull that receives nothing for that long (the network
    between the hosts is broken) ends `OperationTimedOut` instead of waiting on TCP.
    ``objects`` are ``--object`` definitions the source needs (its TLS credentials).
    """
    target = require_new_target(destination)
    deadline = Deadline(timeout)
    fmt = "raw" if verbatim else format_for(target)
    if not verbatim:
        check_maximum(fmt, virtual_size)
    copy_end = 90.0 if fixed and not verbatim else 99.0
    options = [] if verbatim else create_options(fmt, fixed)
    with new_output(target, context.task_id) as temp:
        run_qemu_img(
            ["convert", *(arg for obj in objects for arg in ("--object", obj)), "-p",
             "-f", "raw", "-O", fmt, *options, source_spec, str(temp)],
            context,
            progress_range=(0.0, copy_end),
            timeout=deadline.remaining(),
            stall=None if stall_seconds is None else Stall(stall_seconds, temp),
        )
        if verbatim and temp.stat().st_size > virtual_size:
            # NBD serves whole 512-byte sectors: a file's tail comes padded with zeros.
            os.truncate(temp, virtual_size)
        if fixed and not verbatim:
            allocate(temp, context, ProgressSpan(context, copy_end, 99.0), deadline)
    context.report_progress(100.0)
    return None if verbatim else info(target)
