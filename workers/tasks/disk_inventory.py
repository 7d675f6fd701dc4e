"""A host's disk inventory as Celery tasks: list every image, delete one, grow one.

The listing covers the images users made; a VM's runtime directory (``vms/``),
the lock directory and in-flight temporaries are internals and stay out.  A delete
is refused while a VM of this host has the image among its disks, or while any
image in the root (undo overlays included) has it as its backing file.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from api.enums import VMVMState as S
from api.protocol import keys, tasks
from api.protocol.formats import FORMAT_BY_EXTENSION
from workers.engines import qemu_img
from workers.engines.files import LOCK_DIRECTORY, HostFiles
from workers.engines.storage import resolve_in_root, task_id_of_temporary
from workers.failures import DiskInUse, OperationFailed
from workers.runtime import TaskRun, operation

log = logging.getLogger(__name__)

VM_DIRECTORY = "vms"
MAX_LISTED = 10_000


def _images(root: Path, *, internals: bool) -> list[Path]:
    found: list[Path] = []
    for directory, subdirectories, files in os.walk(root):
        here = Path(directory)
        if here == root:
            subdirectories[:] = [d for d in subdirectories if d != LOCK_DIRECTORY
                                 and (internals or d != VM_DIRECTORY)]
        subdirectories.sort()
        for name in sorted(files):
            path = here / name
            if path.suffix.lower() in FORMAT_BY_EXTENSION and not path.is_symlink() \
                    and task_id_of_temporary(path) is None:
                found.append(path)
        if len(found) > MAX_LISTED:
            break
    return found[:MAX_LISTED]


@operation(tasks.DISK_LIST, soft_time_limit=120)
def list_disks(run: TaskRun) -> dict[str, Any]:
    files = HostFiles.of(run.settings)
    disks: list[dict[str, Any]] = []
    for path in _images(files.root, internals=False):
        try:
            disks.append(files.describe(path))
        except OperationFailed as exc:
            # One unreadable file must not hide the others.
            log.warning("Not listing %s: %s", files.relative(path), exc)
    return {"disks": disks}


def _vms_using(run: TaskRun, files: HostFiles, target: Path, active_only: bool) -> list[str]:
    client = run.redis
    names = sorted(client.smembers(keys.host_vms(run.settings.host)))  # O(own VMs)
    users: list[str] = []
    for name in names:
        host, disks, state = client.hmget(keys.vm_record(name), "host", "disks", "state")
        if host != run.settings.host or not disks:
            continue
        if active_only and state == str(int(S.TurnedOff)):
            continue
        for disk in json.loads(disks):
            try:
                if resolve_in_root(files.root, disk) == target:
                    users.append(name)
            except OperationFailed:
                continue
    return users


def _children(files: HostFiles, target: Path) -> list[str]:
    children: list[str] = []
    for path in _images(files.root, internals=True):
        if path == target or qemu_img.format_for(path) != "qcow2":
            continue
        try:
            parent = qemu_img.info(path).parent
        except OperationFailed:
            continue
        if parent is not None and Path(os.path.realpath(parent)) == target:
            children.append(str(files.relative(path)))
    return children


def refuse_if_in_use(run: TaskRun, files: HostFiles, target: Path, *, deleting: bool) -> None:
    """A delete is refused while any VM has the disk or an image has it as parent; a
    resize while a VM that is not TurnedOff has it (QEMU or a saved state needs it)."""
    users = _vms_using(run, files, target, active_only=not deleting)
    if users:
        raise DiskInUse(f"{files.relative(target)} is attached to VM {', '.join(users)}")
    if deleting:
        children = _children(files, target)
        if children:
            raise DiskInUse(f"{files.relative(target)} is the parent of {', '.join(children)}")


@operation(tasks.DISK_DELETE, soft_time_limit=120)
def delete_disk(run: TaskRun, path: str) -> None:
    files = HostFiles.of(run.settings)
    target = files.resolve(path, must_exist=True)
    qemu_img.format_for(target)  # only disk images: never a kernel or a VM's file
    with files.file_locks([], [target]):
        refuse_if_in_use(run, files, target, deleting=True)
        target.unlink()


@operation(tasks.DISK_RESIZE)
def resize_disk(run: TaskRun, path: str, size_bytes: int) -> dict[str, Any]:
    files = HostFiles.of(run.settings)
    target = files.resolve(path, must_exist=True)
    with ExitStack() as stack:
        chain = files.open_chain(target, stack)  # qemu-img opens the checked chain only
        with files.file_locks(chain.reals[1:], [target]):
            refuse_if_in_use(run, files, target, deleting=False)
            grown = qemu_img.grow(target, size_bytes, run, chain=chain.pinned())
    return files.describe(target, grown)
