"""Every operation's task name, keyword arguments and fixed traits, for both sides.

The producer sends ``spec.name`` with keyword arguments checked against
``spec.params``; the worker registers its body under the same spec, and
`workers.runtime.operation` refuses a body whose parameters differ.  A task name
therefore exists once, and a producer cannot send kwargs no worker accepts.

``quick`` marks the control operations that must never wait behind long work
(pause, turn off, disk info...): they take milliseconds and hold no slot for long.

A VM operation's name is its task name's last part (``vmtask.vm.startup``:
``startup``, `TaskSpec.vm_operation`): the producer checks it against
`vmstate.ALLOWED` and the worker's body begins under it, both from the spec, and
`vmstate` refuses at import a VM task without an entry there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

VM_PREFIX = "vmtask.vm."


@dataclass(frozen=True)
class TaskSpec:
    name: str
    params: tuple[str, ...]
    cancelable: bool
    quick: bool = False
    optional: tuple[str, ...] = ()
    """Parameters the worker defaults; the producer may leave them out."""

    @property
    def vm_operation(self) -> str:
        """The name `vmstate.ALLOWED` knows this VM operation by; `ValueError` for a
        task that is not one."""
        if not self.name.startswith(VM_PREFIX):
            raise ValueError(f"{self.name} is not a VM operation")
        return self.name.removeprefix(VM_PREFIX)

    def check_kwargs(self, kwargs: Mapping[str, Any]) -> None:
        """`TypeError` for kwargs this task does not take, or required ones missing."""
        unknown = set(kwargs) - set(self.params)
        missing = set(self.params) - set(self.optional) - set(kwargs)
        if unknown or missing:
            raise TypeError(
                f"{self.name} takes {', '.join(self.params) or 'no arguments'}; "
                f"unknown: {sorted(unknown)}, missing: {sorted(missing)}"
            )


PING = TaskSpec("vmtask.ping", ("duration_ms", "steps"), cancelable=True,
                optional=("duration_ms", "steps"))

DISK_INFO = TaskSpec("vmtask.disk.info", ("path",), cancelable=False, quick=True)
DISK_CREATE_FIXED = TaskSpec("vmtask.disk.create_fixed", ("path", "size_bytes"), cancelable=True)
DISK_CREATE_DYNAMIC = TaskSpec("vmtask.disk.create_dynamic", ("path", "size_bytes"),
                               cancelable=True)
DISK_CREATE_DIFFERENCING = TaskSpec("vmtask.disk.create_differencing", ("path", "parent_path"),
                                    cancelable=True)
DISK_CREATE_HOST_DRIVE = TaskSpec("vmtask.disk.create_host_drive",
                                  ("path", "host_drive", "read_only"), cancelable=True,
                                  optional=("read_only",))
DISK_COMPACT = TaskSpec("vmtask.disk.compact", ("path",), cancelable=True)
DISK_CONVERT = TaskSpec("vmtask.disk.convert", ("path", "destination", "disk_type"),
                        cancelable=True)
DISK_MERGE_TO = TaskSpec("vmtask.disk.merge_to", ("path", "destination", "disk_type"),
                         cancelable=True)
DISK_MERGE = TaskSpec("vmtask.disk.merge", ("path",), cancelable=False)
DISK_LIST = TaskSpec("vmtask.disk.list", (), cancelable=False, quick=True)
DISK_DELETE = TaskSpec("vmtask.disk.delete", ("path",), cancelable=False, quick=True)
# In place, so not cancelable; long for a preallocated image.
DISK_RESIZE = TaskSpec("vmtask.disk.resize", ("path", "size_bytes"), cancelable=False)
# A copy between hosts is two tasks: the source serves the image over NBD to the one
# client task on the destination, which pulls it.  The producer holds the pull.
DISK_SERVE = TaskSpec("vmtask.disk.serve", ("path", "transfer_id", "client_task_id", "mode"),
                      cancelable=True)
DISK_COPY_IN = TaskSpec("vmtask.disk.copy_in",
                        ("source_host", "path", "destination", "transfer_id", "server_task_id"),
                        cancelable=True)
# A cold migration (TurnedOff or Saved VM) likewise: the source serves the VM's files,
# the destination pulls them and takes the VM over; the producer holds the latter.
VM_MIGRATE_OUT = TaskSpec("vmtask.migrate.out",
                          ("name", "destination_host", "transfer_id", "client_task_id"),
                          cancelable=True)
VM_MIGRATE_IN = TaskSpec("vmtask.migrate.in",
                         ("name", "source_host", "transfer_id", "server_task_id"),
                         cancelable=True)
# A live migration (Running or Paused VM): the source drives and the producer holds
# it; the destination prepares a paused QEMU and NBD exports, then moves the record
# or gives up when the source says so.
VM_LIVE_OUT = TaskSpec("vmtask.migrate.live_out",
                       ("name", "destination_host", "transfer_id", "peer_task_id"),
                       cancelable=True)
VM_LIVE_IN = TaskSpec("vmtask.migrate.live_in",
                      ("name", "source_host", "transfer_id", "peer_task_id"), cancelable=True)

# A composite task (`workers.composite`): it only starts, follows and cancels its
# children, so it runs in the control lane, never taking a slot a child needs (on a
# host of one slot, a parent in the long lane would wait forever on its children).
HOST_EVACUATE = TaskSpec("vmtask.host.evacuate", ("host", "destinations", "max_parallel"),
                         cancelable=True, quick=True)

VM_STARTUP = TaskSpec("vmtask.vm.startup", ("name",), cancelable=True)
VM_SAVE = TaskSpec("vmtask.vm.save", ("name",), cancelable=True)
VM_PAUSE = TaskSpec("vmtask.vm.pause", ("name",), cancelable=False, quick=True)
VM_RESUME = TaskSpec("vmtask.vm.resume", ("name",), cancelable=False, quick=True)
VM_RESET = TaskSpec("vmtask.vm.reset", ("name",), cancelable=False, quick=True)
VM_TURN_OFF = TaskSpec("vmtask.vm.turn_off", ("name",), cancelable=False, quick=True)
VM_MERGE_UNDO_DISKS = TaskSpec("vmtask.vm.merge_undo_disks", ("name",), cancelable=False)
VM_DISCARD_UNDO_DISKS = TaskSpec("vmtask.vm.discard_undo_disks", ("name",), cancelable=False)
VM_DELETE = TaskSpec("vmtask.vm.delete", ("name",), cancelable=False, quick=True)
VM_GUEST_SHUTDOWN = TaskSpec("vmtask.vm.guest_shutdown", ("name", "timeout_s"), cancelable=True,
                             optional=("timeout_s",))
VM_GUEST_RESTART = TaskSpec("vmtask.vm.guest_restart", ("name", "timeout_s"), cancelable=True,
                            optional=("timeout_s",))
VM_GUEST_LOGOFF = TaskSpec("vmtask.vm.guest_logoff", ("name", "timeout_s"), cancelable=True,
                           optional=("timeout_s",))
VM_SCREENSHOT = TaskSpec("vmtask.vm.screenshot", ("name",), cancelable=False, quick=True)
VM_CONSOLE_LOG = TaskSpec("vmtask.vm.console_log", ("name", "tail_bytes"), cancelable=False,
                          quick=True)
VM_GUEST_INFO = TaskSpec("vmtask.vm.guest_info", ("name",), cancelable=False, quick=True)
# Snapshots and clones (issue 23), under the VM's lock; snapshots also live.
VM_CREATE_SNAPSHOT = TaskSpec("vmtask.vm.create_snapshot", ("name", "snapshot", "include_memory"),
                              cancelable=True, optional=("include_memory",))
VM_REVERT_TO_SNAPSHOT = TaskSpec("vmtask.vm.revert_to_snapshot", ("name", "snapshot"),
                                 cancelable=True)
# Cancelable until the tree drops the point; the commit that ends the last one is not.
VM_DELETE_SNAPSHOT = TaskSpec("vmtask.vm.delete_snapshot", ("name", "snapshot"), cancelable=True)
VM_CLONE = TaskSpec("vmtask.vm.clone", ("name", "clone", "linked", "snapshot"), cancelable=True)
# hd.resize of a disk of a Running or Paused VM: QMP block_resize, at once.
VM_RESIZE_DISK = TaskSpec("vmtask.vm.resize_disk", ("name", "path", "size_bytes"),
                          cancelable=False)
# A full clone onto another host: the source serves each disk's chain flattened
# under the VM's lock, the destination pulls them and creates the clone there (the
# producer holds the latter).
VM_CLONE_OUT = TaskSpec("vmtask.vm.clone_out", ("name", "snapshot", "destination_host",
                                                "transfer_id", "client_task_id"),
                        cancelable=True)
# The destination half checks no VM state (the source half holds the lock): not a
# VM operation of the state machine, as a migration's halves are not.
VM_CLONE_IN = TaskSpec("vmtask.clone.in", ("name", "clone", "snapshot", "source_host",
                                              "transfer_id", "server_task_id"),
                       cancelable=True)
# Backups (issue 24): into a repository folder on the VM's host, under the VM's lock.
VM_BACKUP = TaskSpec("vmtask.vm.backup", ("name", "repository", "full"), cancelable=True)
BACKUP_RESTORE = TaskSpec("vmtask.backup.restore", ("repository", "backup_id", "name"),
                          cancelable=True)
BACKUP_PRUNE = TaskSpec("vmtask.backup.prune", ("repository", "keep_last"), cancelable=True)
BACKUP_VERIFY = TaskSpec("vmtask.backup.verify", ("repository", "backup_id"), cancelable=True)

ALL: tuple[TaskSpec, ...] = tuple(v for v in globals().values() if isinstance(v, TaskSpec))
BY_NAME: Mapping[str, TaskSpec] = {spec.name: spec for spec in ALL}

# The VM operations by the name the state machine (`vmstate.ALLOWED`) uses.
VM_OPERATIONS: Mapping[str, TaskSpec] = {
    spec.vm_operation: spec for spec in ALL if spec.name.startswith(VM_PREFIX)
}
