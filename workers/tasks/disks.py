"""The disk operations as Celery tasks: resolve paths, take file locks, run the engine.

Each operation names the files it reads and writes.  Before running it takes
shared locks on what it reads and exclusive locks on what it writes (fcntl locks
on the host, so they vanish with a dead process); a conflict with another task
ends the operation at once with ERROR_SHARING_VIOLATION rather than corrupting an
image.  Paths travel as strings relative to the storage root.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import redis

from api.enums import VMHardDiskType
from api.protocol import keys, tasks
from api.protocol.lease import Holder
from api.settings import Settings
from workers.engines import qemu_img
from workers.engines.files import HostFiles
from workers.engines.storage import remove_stale_temporaries
from workers.failures import IllegalValue
from workers.runtime import TaskRun, operation

log = logging.getLogger(__name__)


@operation(tasks.DISK_INFO, soft_time_limit=60)
def disk_info(run: TaskRun, path: str) -> dict[str, Any]:
    files = HostFiles.of(run.settings)
    return files.describe(files.resolve(path, must_exist=True))


def _create_new(run: TaskRun, engine: Callable[..., qemu_img.DiskInfo], path: str,
                size_bytes: int) -> dict[str, Any]:
    files = HostFiles.of(run.settings)
    target = files.resolve_output(path)
    with files.file_locks([], [target]):
        made = engine(target, size_bytes, run)
    return files.describe(target, made)


@operation(tasks.DISK_CREATE_FIXED)
def create_fixed(run: TaskRun, path: str, size_bytes: int) -> dict[str, Any]:
    return _create_new(run, qemu_img.create_fixed, path, size_bytes)


@operation(tasks.DISK_CREATE_DYNAMIC)
def create_dynamic(run: TaskRun, path: str, size_bytes: int) -> dict[str, Any]:
    return _create_new(run, qemu_img.create_dynamic, path, size_bytes)


@operation(tasks.DISK_CREATE_DIFFERENCING)
def create_differencing(run: TaskRun, path: str, parent_path: str) -> dict[str, Any]:
    files = HostFiles.of(run.settings)
    target = files.resolve_output(path)
    parent = files.resolve(parent_path, must_exist=True)
    # The parent's whole chain must be confined: the overlay would expose it.  Its
    # size comes from that check; qemu-img does not open it again by name.
    with ExitStack() as stack:
        chain = files.open_chain(parent, stack)
        with files.file_locks(chain.reals, [target]):
            qemu_img.create_differencing(target, parent, run,
                                         parent_info=chain.links[0].info)
    return files.describe(target)


@operation(tasks.DISK_CREATE_HOST_DRIVE)
def create_host_drive(run: TaskRun, path: str, host_drive: str,
                      read_only: bool = True) -> dict[str, Any]:
    files = HostFiles.of(run.settings)
    target = files.resolve_output(path)
    device = files.allowed_host_drive(host_drive)
    reads, writes = ([device], [target]) if read_only else ([], [target, device])
    with files.file_locks(reads, writes):
        qemu_img.create_host_drive(target, device, run, read_only=read_only)
    return files.describe(target)


@operation(tasks.DISK_COMPACT)
def compact(run: TaskRun, path: str) -> dict[str, Any]:
    files = HostFiles.of(run.settings)
    source = files.resolve(path, must_exist=True)
    with ExitStack() as stack:
        chain = files.open_chain(source, stack)
        with files.file_locks(chain.reals[1:], [source]):
            qemu_img.compact(source, run, chain=chain.pinned())
    return files.describe(source)


def _copy_to_new_disk(run: TaskRun, engine: Callable[..., qemu_img.DiskInfo], path: str,
                      destination: str, disk_type: int) -> dict[str, Any]:
    """convert and merge_to: read a whole chain, pinned, into a new disk."""
    files = HostFiles.of(run.settings)
    source = files.resolve(path, must_exist=True)
    target = files.resolve_output(destination)
    fixed = VMHardDiskType(disk_type) is VMHardDiskType.FixedSize
    with ExitStack() as stack:
        chain = files.open_chain(source, stack)
        with files.file_locks(chain.reals, [target]):
            made = engine(source, target, fixed, run, chain=chain.pinned(),
                          source_info=chain.links[0].info)
    return files.describe(target, made)


@operation(tasks.DISK_CONVERT)
def convert(run: TaskRun, path: str, destination: str, disk_type: int) -> dict[str, Any]:
    return _copy_to_new_disk(run, qemu_img.convert, path, destination, disk_type)


@operation(tasks.DISK_MERGE_TO)
def merge_to(run: TaskRun, path: str, destination: str, disk_type: int) -> dict[str, Any]:
    return _copy_to_new_disk(run, qemu_img.merge_to, path, destination, disk_type)


@operation(tasks.DISK_MERGE)
def merge(run: TaskRun, path: str) -> dict[str, Any]:
    files = HostFiles.of(run.settings)
    source = files.resolve(path, must_exist=True)
    with ExitStack() as stack:
        chain = files.open_chain(source, stack)
        reals = chain.reals
        if len(reals) < 2:
            raise IllegalValue(
                f"{path} is not a differencing disk: it has no parent to merge into")
        with files.file_locks(reals[2:], reals[:2]):
            qemu_img.merge(source, run, chain=chain.pinned())
    return files.describe(reals[1])


def process_exists(pid: int) -> bool:
    """True for a live process; a zombie (killed, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def lease_live(client: redis.Redis, task_id: str) -> bool:
    """Whether the task's lease is held by a worker that may still run it: one on
    another machine (which cannot be looked for from here), or a process that still
    exists here (a worker killed a moment ago leaves a lease that has not expired)."""
    value = client.get(keys.task_lease(task_id))
    if value is None:
        return False
    holder = Holder.parse(str(value))
    return not holder.on_this_machine or process_exists(holder.pid)


def remove_crashed_temporaries(client: redis.Redis, settings: Settings) -> None:
    """A task that died mid-write left its temporary file; remove it.

    A temporary is live only while its task's lease is held by a live worker
    (`lease_live`).
    """

    def is_live(task_id: str) -> bool:
        return lease_live(client, task_id)

    for path in remove_stale_temporaries(HostFiles.of(settings).root, is_live):
        log.warning("Removed %s, left by a task that crashed", path)

