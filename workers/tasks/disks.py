"""The disk operations as Celery tasks: resolve paths, take file locks, run the engine.

Each operation names the files it reads and writes.  Before running it takes
shared locks on what it reads and exclusive locks on what it writes (fcntl locks
on the host, so they vanish with a dead process); a conflict with another task
ends the operation at once with ERROR_SHARING_VIOLATION rather than corrupting an
image.  Paths travel as strings relative to the storage root.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import redis

from api.enums import VMHardDiskType
from api.protocol import hresults, keys
from workers.app import settings
from workers.engines import qemu_img
from workers.engines.storage import free_space, remove_stale_temporaries, resolve_in_root
from workers.failures import DiskError, IllegalValue
from workers.host import startup_hooks
from workers.runtime import TaskRun, operation

LOCK_DIRECTORY = ".vmtask-locks"
log = logging.getLogger(__name__)


def root() -> Path:
    settings.storage_root.mkdir(parents=True, exist_ok=True)
    return settings.storage_root.resolve()


def resolve(path: str, *, must_exist: bool = False) -> Path:
    return resolve_in_root(root(), path, must_exist=must_exist)


def resolve_output(path: str) -> Path:
    """An output path; its directories are created (they are inside the root)."""
    target = resolve_in_root(root(), path)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def relative(path: Path | str | None) -> str | None:
    """A worker path as the producer names it: relative to the root when inside it."""
    if path is None:
        return None
    real = Path(os.path.realpath(path))
    return str(real.relative_to(root())) if real.is_relative_to(root()) else str(path)


def chain_infos(path: Path) -> list[qemu_img.DiskInfo]:
    """``qemu-img info`` of the image and of each parent (backing file), nearest first."""
    chain = [qemu_img.info(path)]
    while (parent := chain[-1].parent) is not None:
        if len(chain) > 64:
            raise IllegalValue(f"The backing chain of {relative(path)} is too deep")
        chain.append(qemu_img.info(Path(parent)))
    return chain


def chain_of(path: Path) -> list[Path]:
    """The image and its parents (backing files), nearest first."""
    return [Path(info.file) for info in chain_infos(path)]


@contextmanager
def file_locks(reads: Sequence[Path], writes: Sequence[Path]) -> Iterator[None]:
    """Shared locks on ``reads``, exclusive on ``writes``; refuse at once on conflict."""
    lock_dir = root() / LOCK_DIRECTORY
    lock_dir.mkdir(exist_ok=True)
    wanted: dict[Path, int] = {p: fcntl.LOCK_SH for p in reads}
    wanted.update({p: fcntl.LOCK_EX for p in writes})
    with ExitStack() as stack:
        for path in sorted(wanted):  # one order for every task: no lock-order deadlock
            name = hashlib.sha256(str(path).encode()).hexdigest()[:32]
            fd = os.open(lock_dir / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            stack.callback(os.close, fd)
            try:
                fcntl.flock(fd, wanted[path] | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DiskError(
                    f"{relative(path)} is in use by another task", hresults.SHARING_VIOLATION
                ) from None
        yield


def describe(path: Path, known: qemu_img.DiskInfo | None = None) -> dict[str, Any]:
    """What `HardDisk` shows: the image, then its parents, paths relative to the root.

    ``known`` is the image's info when the engine just produced it (and it has no
    parent), which saves reading it again.
    """
    infos = [known] if known is not None and known.parent is None else chain_infos(path)
    chain: list[dict[str, Any]] = []
    for info in infos:
        chain.append({
            "file": relative(info.file),
            "type": int(info.disk_type),
            "format": info.format,
            "size_in_guest": info.virtual_size,
            "size_on_host": info.actual_size,
            "host_drive": info.host_drive,
            "read_only": info.read_only,
        })
    return {"chain": chain, "host_free_disk_space": free_space(root())}


@operation("vmtask.disk.info", cancelable=False, soft_time_limit=60)
def disk_info(run: TaskRun, path: str) -> dict[str, Any]:
    return describe(resolve(path, must_exist=True))


@operation("vmtask.disk.create_fixed", cancelable=True)
def create_fixed(run: TaskRun, path: str, size_bytes: int) -> dict[str, Any]:
    target = resolve_output(path)
    with file_locks([], [target]):
        made = qemu_img.create_fixed(target, size_bytes, run, run.task_id)
    return describe(target, made)


@operation("vmtask.disk.create_dynamic", cancelable=True)
def create_dynamic(run: TaskRun, path: str, size_bytes: int) -> dict[str, Any]:
    target = resolve_output(path)
    with file_locks([], [target]):
        made = qemu_img.create_dynamic(target, size_bytes, run, run.task_id)
    return describe(target, made)


@operation("vmtask.disk.create_differencing", cancelable=True)
def create_differencing(run: TaskRun, path: str, parent_path: str) -> dict[str, Any]:
    target = resolve_output(path)
    parent = resolve(parent_path, must_exist=True)
    with file_locks(chain_of(parent), [target]):
        qemu_img.create_differencing(target, parent, run, run.task_id)
    return describe(target)


def allowed_host_drive(device: str) -> Path:
    """A host drive must be named by the host's allow-list (exact, or under a prefix/)."""
    for entry in settings.host_drive_allow:
        if device == entry or (entry.endswith("/") and device.startswith(entry)):
            real = Path(os.path.realpath(device))
            if str(real) == entry or (entry.endswith("/") and str(real).startswith(entry)):
                return real
            break
    raise DiskError(
        f"Host drive {device!r} is not allowed on host {settings.host} "
        "(see VMTASK_HOST_DRIVE_ALLOW)", hresults.ACCESS_DENIED
    )


@operation("vmtask.disk.create_host_drive", cancelable=True)
def create_host_drive(run: TaskRun, path: str, host_drive: str,
                      read_only: bool = True) -> dict[str, Any]:
    target = resolve_output(path)
    device = allowed_host_drive(host_drive)
    with file_locks([device] if read_only else [], [target] + ([] if read_only else [device])):
        qemu_img.create_host_drive(target, device, run, run.task_id, read_only=read_only)
    return describe(target)


@operation("vmtask.disk.compact", cancelable=True)
def compact(run: TaskRun, path: str) -> dict[str, Any]:
    source = resolve(path, must_exist=True)
    chain = chain_of(source)
    with file_locks(chain[1:], [source]):
        qemu_img.compact(source, run, run.task_id)
    return describe(source)


@operation("vmtask.disk.convert", cancelable=True)
def convert(run: TaskRun, path: str, destination: str, disk_type: int) -> dict[str, Any]:
    source = resolve(path, must_exist=True)
    target = resolve_output(destination)
    fixed = VMHardDiskType(disk_type) is VMHardDiskType.FixedSize
    with file_locks(chain_of(source), [target]):
        made = qemu_img.convert(source, target, fixed, run, run.task_id)
    return describe(target, made)


@operation("vmtask.disk.merge_to", cancelable=True)
def merge_to(run: TaskRun, path: str, destination: str, disk_type: int) -> dict[str, Any]:
    source = resolve(path, must_exist=True)
    target = resolve_output(destination)
    fixed = VMHardDiskType(disk_type) is VMHardDiskType.FixedSize
    with file_locks(chain_of(source), [target]):
        made = qemu_img.merge_to(source, target, fixed, run, run.task_id)
    return describe(target, made)


@operation("vmtask.disk.merge", cancelable=False)
def merge(run: TaskRun, path: str) -> dict[str, Any]:
    source = resolve(path, must_exist=True)
    chain = chain_of(source)
    if len(chain) < 2:
        raise IllegalValue(f"{path} is not a differencing disk: it has no parent to merge into")
    with file_locks(chain[2:], chain[:2]):
        qemu_img.merge(source, run, run.task_id)
    return describe(chain[1])


def process_exists(pid: int) -> bool:
    """True for a live process; a zombie (killed, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _remove_crashed_temporaries(client: redis.Redis) -> None:
    """A task that died mid-write left its temporary file; remove it.

    A temporary is live only while its task's lease is held by a process that still
    exists: a worker killed a moment ago leaves a lease that has not expired yet.
    """
    machine = socket.gethostname()

    def is_live(task_id: str) -> bool:
        holder = client.get(keys.task_lease(task_id))
        if holder is None:
            return False
        _host, holder_machine, pid = str(holder).rsplit(":", 2)
        if holder_machine != machine:
            return True
        return process_exists(int(pid))

    for path in remove_stale_temporaries(root(), is_live):
        log.warning("Removed %s, left by a task that crashed", path)


startup_hooks.append(_remove_crashed_temporaries)
