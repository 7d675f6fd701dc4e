"""The files an operation touches: checked paths, and new images built under a temporary.

Paths given to the operations are absolute and already confined by
`workers.engines.storage.resolve_in_root`; `require_source` and `require_new_target`
check what an operation needs of them.  Every operation that produces a file builds
it under a temporary name beside the target (`new_output`) and publishes it with
`workers.engines.storage.publish_atomically` only on success, durably; a failure or
a cancel removes the temporary.  A fixed disk is allocated block by block
(`allocate`) after qemu-img wrote it, so it cannot run out of space later.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from api.protocol import hresults
from workers.engines.context import OperationContext, ProgressSpan, raise_if_cancelled
from workers.engines.qemu_img.errors import disk_error
from workers.engines.qemu_img.runner import Deadline
from workers.engines.qemu_img.sizes import MiB
from workers.engines.storage import (
    fsync_directory,
    publish_atomically,
    remove_quietly,
    temporary_path_for,
)
from workers.failures import DiskError, IllegalValue


def require_absolute(path: Path) -> Path:
    path = Path(path)
    if not path.is_absolute():
        raise IllegalValue(f"{path} is not an absolute, resolved path")
    return path


def require_source(path: Path) -> Path:
    path = require_absolute(path)
    if not os.path.lexists(path):
        raise DiskError(f"{path} does not exist", hresults.FILE_NOT_FOUND)
    return path


def require_new_target(path: Path) -> Path:
    path = require_absolute(path)
    if os.path.lexists(path):
        raise DiskError(f"{path} already exists", hresults.FILE_EXISTS)
    if not path.parent.is_dir():
        raise DiskError(f"The directory {path.parent} does not exist", hresults.FILE_NOT_FOUND)
    return path


@contextmanager
def new_output(target: Path, task_id: str) -> Iterator[Path]:
    """Yield the temporary path to build ``target`` in; publish it if the body succeeds.

    The temporary is removed on every way out, so a failure or a cancel leaves
    nothing behind, and after a successful publish it no longer exists anyway.
    """
    temp = temporary_path_for(target, task_id)
    remove_quietly(temp)  # an earlier attempt of this same task may have died here
    try:
        yield temp
        fsync_file(temp)
        publish_atomically(temp, target)
        fsync_directory(target.parent)
    finally:
        remove_quietly(temp)


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to disk; a failure is a `DiskError`."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise disk_error(exc, f"Cannot open {path}") from exc
    try:
        os.fsync(fd)
    except OSError as exc:
        raise disk_error(exc, f"Cannot flush {path}") from exc
    finally:
        os.close(fd)


ALLOCATION_CHUNK = 64 * MiB


def allocate(
    path: Path, context: OperationContext, progress: ProgressSpan, deadline: Deadline
) -> None:
    """Reserve every byte of ``path`` on disk, chunk by chunk.

    This is what makes a fixed disk fixed: qemu-img leaves holes, and a hole would
    turn into ENOSPC inside a running guest.  Here ENOSPC surfaces as disk full, and
    cancel and the deadline are honoured between chunks.
    """
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        raise disk_error(exc, f"Cannot open {path}") from exc
    try:
        size = os.fstat(fd).st_size
        offset = 0
        progress.step(0.0)
        while offset < size:
            raise_if_cancelled(context)
            deadline.remaining()
            length = min(ALLOCATION_CHUNK, size - offset)
            try:
                # glibc falls back to writing a zero byte only into blocks that read
                # as zero, so existing data is never touched.
                os.posix_fallocate(fd, offset, length)
            except OSError as exc:
                raise disk_error(exc, f"Cannot allocate {path}") from exc
            offset += length
            progress.step(100.0 * offset / size)
    finally:
        os.close(fd)


def create_options(fmt: str, fixed: bool) -> list[str]:
    """``-o`` options for a new image; fixed ones are preallocated by `allocate`."""
    if fmt == "vpc":
        subformat = "fixed" if fixed else "dynamic"
        return ["-o", f"subformat={subformat},force_size=on"]
    if fmt == "vhdx":
        return ["-o", f"subformat={'fixed' if fixed else 'dynamic'}"]
    if fmt == "qcow2" and fixed:
        # Map every cluster now; allocate then backs the mapped area with blocks.
        return ["-o", "preallocation=metadata"]
    return []
