"""`HardDisk` (IVMHardDisk) and the disk operations of `VirtualServer`.

A `HardDisk` is what the owning host's ``qemu-img info`` said when it was read;
`refresh()` reads it again.  Its operations return `VMTask`s like every other.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from api.arguments import check_relative_path, disk_size_bytes, format_for_name
from api.core import Peer, ServerCore, submit_peers
from api.enums import VMHardDiskType, VMVMState
from api.errors import (
    InvalidArgumentError,
    InvalidStateError,
    NotFoundError,
    OperationFailedError,
)
from api.protocol import keys, tasks
from api.protocol.hresults import DISK_FULL, FILE_NOT_FOUND
from api.protocol.tasks import TaskSpec
from api.queued import QueuedOperations
from api.settings import validate_host_name
from api.store import broker_errors
from api.task import VMTask

MiB = 1 << 20
INFO_TIMEOUT_MS = 60_000
DISK_TYPE_NAMES = {VMHardDiskType.Dynamic: "dynamic", VMHardDiskType.FixedSize: "fixed-size"}


def _target_type(disk_type: VMHardDiskType | int) -> VMHardDiskType:
    try:
        kind = VMHardDiskType(disk_type)
    except ValueError:
        kind = None
    if kind not in DISK_TYPE_NAMES:
        raise InvalidArgumentError(
            f"disk_type must be VMHardDiskType.Dynamic or FixedSize, not {disk_type!r}"
        )
    assert kind is not None
    return kind


@dataclass(frozen=True)
class HardDisk:
    server: DiskOperations
    host: str
    file: str
    type: VMHardDiskType
    format: str
    size_in_guest: int
    size_on_host: int
    host_free_disk_space: int
    host_drive: str | None
    parent: HardDisk | None

    @classmethod
    def from_info(cls, server: DiskOperations, host: str, info: Mapping[str, Any]) -> HardDisk:
        parent: HardDisk | None = None
        for link in reversed(info["chain"]):  # build from the root of the chain up
            parent = cls(
                server=server, host=host, file=link["file"], type=VMHardDiskType(link["type"]),
                format=link["format"], size_in_guest=link["size_in_guest"],
                size_on_host=link["size_on_host"],
                host_free_disk_space=info["host_free_disk_space"],
                host_drive=link.get("host_drive"), parent=parent,
            )
        assert parent is not None
        return parent

    def refresh(self) -> HardDisk:
        return self.server.get_hard_disk(self.file, host=self.host)

    def compact(self) -> VMTask:
        return self.server.submit(
            tasks.DISK_COMPACT, description=f"Compacting {self.file}",
            kwargs={"path": self.file}, host=self.host)

    def convert(self, destination: str, disk_type: VMHardDiskType | int) -> VMTask:
        kind = _target_type(disk_type)
        check_relative_path(destination, "destination")
        format_for_name(destination)
        return self.server.submit(
            tasks.DISK_CONVERT,
            description=f"Converting {self.file} to {DISK_TYPE_NAMES[kind]} {destination}",
            kwargs={"path": self.file, "destination": destination, "disk_type": int(kind)},
            host=self.host)

    def merge(self) -> VMTask:
        """Merge this differencing disk into its parent (in place: not cancelable)."""
        if self.parent is None:
            raise InvalidArgumentError(f"{self.file} is not a differencing disk")
        return self.server.submit(
            tasks.DISK_MERGE, description=f"Merging {self.file} into {self.parent.file}",
            kwargs={"path": self.file}, host=self.host)

    def merge_to(self, destination: str, disk_type: VMHardDiskType | int) -> VMTask:
        kind = _target_type(disk_type)
        check_relative_path(destination, "destination")
        format_for_name(destination)
        return self.server.submit(
            tasks.DISK_MERGE_TO,
            description=f"Merging the chain of {self.file} into {DISK_TYPE_NAMES[kind]} "
                        f"{destination}",
            kwargs={"path": self.file, "destination": destination, "disk_type": int(kind)},
            host=self.host)

    def copy_to(self, destination_host: str, destination_path: str) -> VMTask:
        """Copy this disk to ``destination_path`` in ``destination_host``'s storage root.

        The copy is a standalone disk in the format of ``destination_path``'s extension
        (a differencing disk's whole chain collapses into it), fixed-size if this
        disk is.  The bytes go host to host over NBD, never through Redis.  The
        returned task runs on the destination host: its progress is the copy's, and
        cancelling it leaves nothing there.  The source is only read.  A destination
        host that is not live, or short of space, is refused before anything is
        queued; an existing destination file ends the task FILE_EXISTS before
        anything is copied.
        """
        validate_host_name(destination_host)
        check_relative_path(destination_path, "destination_path")
        format_for_name(destination_path)
        target = self.server.placeable_host(destination_host,
                                            f"copying a disk to {destination_path}")
        fixed = self.type is VMHardDiskType.FixedSize
        needed = self.size_in_guest if fixed else sum(
            disk.size_on_host for disk in _chain_of(self))
        free = self.server.host_status().get(target, {}).get("storage_free_bytes")
        if isinstance(free, int) and free < needed:
            raise InvalidArgumentError(
                f"Host {target} has {free} bytes free; copying {self.file} needs {needed}",
                DISK_FULL)
        transfer_id, pull_id, serve_id = (str(uuid.uuid4()) for _ in range(3))
        return submit_peers(
            self.server,
            Peer(tasks.DISK_SERVE, f"Serving {self.file} to {target}",
                 {"path": self.file, "transfer_id": transfer_id, "client_task_id": pull_id,
                  "mode": "image"},
                 host=self.host, task_id=serve_id),
            Peer(tasks.DISK_COPY_IN,
                 f"Copying {self.host}:{self.file} to {target}:{destination_path}",
                 {"source_host": self.host, "path": self.file,
                  "destination": destination_path, "transfer_id": transfer_id,
                  "server_task_id": serve_id},
                 host=target, task_id=pull_id))

    def delete(self) -> VMTask:
        """Delete the image; refused (InvalidStateError) while a VM uses it or another
        disk has it as its parent.  The worker checks both again before deleting."""
        users = self.server.vms_using(self.host, self.file)
        if users:
            raise InvalidStateError(f"{self.file} is attached to VM {', '.join(users)}")
        children = [d.file for d in self.server.hard_disks(self.host)
                    if d.parent is not None and d.parent.file == self.file]
        if children:
            raise InvalidStateError(f"{self.file} is the parent of {', '.join(children)}")
        return self.server.submit(tasks.DISK_DELETE, description=f"Deleting {self.file}",
                                  kwargs={"path": self.file}, host=self.host)

    def resize(self, size_mb: int) -> VMTask:
        """Grow the disk to ``size_mb``: qemu-img resize, or QMP ``block_resize`` when
        the VM using it is Running or Paused (live).  Shrinking is refused, and so is a
        disk of a Saved VM, one under snapshots and one of an undoable running VM."""
        size = disk_size_bytes(self.file, size_mb)
        if size <= self.size_in_guest:
            raise InvalidArgumentError(
                f"{self.file} is {self.size_in_guest // MiB} MB: resize only grows a disk "
                f"(shrinking would cut off the guest's data), not to {size_mb} MB")
        trees = self.server.vms_using(self.host, self.file, with_snapshots=True)
        if trees:  # the snapshots' layers, and the present, keep the size they were made with
            raise InvalidStateError(f"{self.file} is the base of the snapshots of VM "
                                    f"{', '.join(trees)}: resizing it is not supported yet")
        users = self.server.vms_using(self.host, self.file, active_only=True)
        if users:
            return self._resize_live(users, size, size_mb)
        return self.server.submit(tasks.DISK_RESIZE,
                                  description=f"Growing {self.file} to {size_mb} MB",
                                  kwargs={"path": self.file, "size_bytes": size}, host=self.host)


    def _resize_live(self, users: list[str], size: int, size_mb: int) -> VMTask:
        with broker_errors(self.server.url):
            records = {name: self.server.redis.hgetall(keys.vm_record(name)) for name in users}
        states = {name: VMVMState(int(r.get("state") or 0)) for name, r in records.items()}
        live = (VMVMState.Running, VMVMState.Paused)
        if len(users) != 1 or states[users[0]] not in live:
            raise InvalidStateError(
                f"{self.file} is attached to VM {', '.join(users)}, which is "
                f"{'/'.join(s.name for s in states.values())}: only a Running or Paused "
                "VM's disk grows live")
        name = users[0]
        if records[name].get("undoable") == "1":
            raise InvalidStateError(
                f"VM {name!r} is undoable: its running disk is an undo overlay, which "
                "does not grow live (turn it off first)")
        return self.server.submit(tasks.VM_RESIZE_DISK,
                                  description=f"Growing {self.file} of VM {name} to "
                                              f"{size_mb} MB (live)",
                                  kwargs={"name": name, "path": self.file,
                                          "size_bytes": size}, host=self.host)


def _chain_of(disk: HardDisk) -> list[HardDisk]:
    chain: list[HardDisk] = []
    link: HardDisk | None = disk
    while link is not None:
        chain.append(link)
        link = link.parent
    return chain


class DiskOperations(ServerCore, QueuedOperations[VMTask]):
    """The IVMVirtualServer disk methods; mixed into `VirtualServer`."""

    def _queue(self, spec: TaskSpec, description: str, kwargs: dict[str, Any],
               host: str | None) -> VMTask:
        return self.submit(spec, description=description, kwargs=kwargs, host=host)

    def hard_disks(self, host: str | None = None) -> list[HardDisk]:
        """Every image in the host's storage root, VM internals (``vms/``) excluded."""
        target = self.resolve_host(host)
        output = self.run_quick(tasks.DISK_LIST, description=f"Listing the disks of {target}",
                                kwargs={}, host=target)
        return [HardDisk.from_info(self, target, info) for info in output["disks"]]

    def vms_using(self, host: str, path: str, *, active_only: bool = False,
                  with_snapshots: bool = False) -> list[str]:
        """The VMs of ``host`` that have ``path`` among their disks (with
        ``active_only``: those not TurnedOff, whose QEMU or saved state needs it as is;
        with ``with_snapshots``: those whose snapshot tree rests on it)."""
        with broker_errors(self.url):
            # O(the host's VMs), through its VM set (`keys.host_vms`).
            names = sorted(self.redis.smembers(keys.host_vms(host)))
            pipe = self.redis.pipeline(transaction=False)
            for name in names:
                pipe.hmget(keys.vm_record(name), "host", "disks", "state", "snapshots")
            found = pipe.execute() if names else []
        return [name for name, (vm_host, disks, state, tree) in zip(names, found, strict=True)
                if vm_host == host and disks and path in json.loads(disks)
                and not (active_only and state == str(int(VMVMState.TurnedOff)))
                and not (with_snapshots and not json.loads(tree or "{}").get("snapshots"))]

    def get_hard_disk(self, path: str, *, host: str | None = None) -> HardDisk:
        check_relative_path(path)
        format_for_name(path)
        task = self.submit(tasks.DISK_INFO, description=f"Reading {path}",
                           kwargs={"path": path}, host=host)
        if not task.wait_for_completion(INFO_TIMEOUT_MS):
            raise OperationFailedError(f"Host {task.host} did not answer about {path} in time")
        snap = task.snapshot()
        target = snap.host
        if snap.output is None:
            cls = NotFoundError if snap.error == FILE_NOT_FOUND else OperationFailedError
            raise cls(f"Cannot read {path} on {target}: {snap.error_description}", snap.error)
        return HardDisk.from_info(self, target, snap.output)

