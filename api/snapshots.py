"""Snapshots and clones of a VM, producer side: `Snapshot` and the `VirtualMachine`
methods (a mixin), each checked before anything is queued.

Snapshots are taken, reverted and deleted, and clones made, in any stable state
(live for Running and Paused VMs, which are not stopped).  A full clone may go onto
another host (``host=``), over the transfer channel; a linked one stays on its
source's host.  Snapshots of undoable VMs are refused with `InvalidStateError`
saying that they are not supported yet.  The tree is read from
the VM's record (its host's worker writes it there after each change), so
`snapshots` needs no task.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from api.core import Peer, submit_peers
from api.enums import VMVMState
from api.errors import InvalidArgumentError, InvalidStateError
from api.protocol import keys, tasks
from api.protocol.snapshots import SNAPSHOT_NAME, descendants, linked_clones, tree_of
from api.settings import validate_host_name
from api.store import broker_errors

if TYPE_CHECKING:
    from api.core import ServerCore
    from api.task import VMTask

NOT_YET = "not supported yet"


@dataclass(frozen=True)
class Snapshot:
    """One named point of a VM's tree (creation order in `VirtualMachine.snapshots`)."""

    name: str
    parent: str | None
    created: float
    include_memory: bool
    state: VMVMState
    size_on_host: int
    is_current: bool


def check_snapshot_name(name: object) -> str:
    if not isinstance(name, str) or not SNAPSHOT_NAME.fullmatch(name):
        raise InvalidArgumentError(
            f"Invalid snapshot name {name!r}: 1-64 letters, digits, '.', '_' or '-'")
    return name


def snapshots_of(record: Mapping[str, str]) -> list[Snapshot]:
    tree = tree_of(dict(record))
    by_name = {s["name"]: s for s in tree["snapshots"]}
    current: set[str] = set()
    name = tree["present_parent"]
    while name is not None and name in by_name:
        current.add(name)
        name = by_name[name]["parent"]
    return [Snapshot(name=s["name"], parent=s["parent"], created=float(s["created"]),
                     include_memory=bool(s["include_memory"]), state=VMVMState(s["state"]),
                     size_on_host=int(s["size_on_host"]), is_current=s["name"] in current)
            for s in tree["snapshots"]]


class SnapshotMethods:
    """`VirtualMachine`'s snapshot and clone operations."""

    name: str
    host: str
    undoable: bool
    _server: ServerCore

    if TYPE_CHECKING:
        def _read(self) -> tuple[dict[str, str], VMVMState]: ...

    def _snapshot_state(self, what: str) -> dict[str, str]:
        record, state = self._read()
        if state not in (VMVMState.TurnedOff, VMVMState.Saved, VMVMState.Running,
                         VMVMState.Paused):
            raise InvalidStateError(
                f"Cannot {what} of VM {self.name!r} while it is {state.name}: it must be "
                "Running, Paused, TurnedOff or Saved")
        return record

    def _submit(self, spec: tasks.TaskSpec, description: str, **kwargs: Any) -> VMTask:
        return self._server.submit(spec, description=description,
                                   kwargs={"name": self.name, **kwargs}, host=self.host)

    @property
    def snapshots(self) -> list[Snapshot]:
        """The VM's snapshots in creation order; a Redis read, no task."""
        return snapshots_of(self._read()[0])

    def create_snapshot(self, name: str, include_memory: bool = True) -> VMTask:
        """A new point of the tree; the VM keeps its state.  Cancelable: a cancelled or
        failed one leaves no trace.  A Running or Paused VM's RAM and devices belong to
        the point when ``include_memory`` (output ``paused_ms``: how long the guest
        stood still); without, its file systems are frozen through its agent while the
        disks switch.  A Saved VM's saved state belongs to the point when
        ``include_memory``; a TurnedOff VM has no memory (include_memory reads False)."""
        check_snapshot_name(name)
        if not isinstance(include_memory, bool):
            raise InvalidArgumentError("include_memory must be True or False")
        if self.undoable:
            raise InvalidStateError(
                f"VM {self.name!r} is undoable: snapshots beside undo disks are {NOT_YET}")
        record = self._snapshot_state("take a snapshot")
        if not json.loads(record.get("disks") or "[]"):
            raise InvalidArgumentError(f"VM {self.name!r} has no disks to snapshot")
        if name in [s.name for s in snapshots_of(record)]:
            raise InvalidArgumentError(f"VM {self.name!r} already has a snapshot named {name!r}")
        return self._submit(tasks.VM_CREATE_SNAPSHOT,
                            f"Taking snapshot {name} of VM {self.name}",
                            snapshot=name, include_memory=include_memory)

    def _existing(self, record: Mapping[str, str], name: str) -> None:
        if name not in [s.name for s in snapshots_of(record)]:
            raise InvalidArgumentError(f"VM {self.name!r} has no snapshot named {name!r}")

    def revert_to_snapshot(self, name: str) -> VMTask:
        """The VM as it was at that point; what changed since is discarded."""
        check_snapshot_name(name)
        record = self._snapshot_state("revert to a snapshot")
        self._existing(record, name)
        return self._submit(tasks.VM_REVERT_TO_SNAPSHOT,
                            f"Reverting VM {self.name} to snapshot {name}", snapshot=name)

    def delete_snapshot(self, name: str) -> VMTask:
        """Remove that point only: the present and every other point read the same."""
        check_snapshot_name(name)
        record = self._snapshot_state("delete a snapshot")
        self._existing(record, name)
        below = descendants(dict(record), name)
        with broker_errors(self._server.url):
            clones = linked_clones(self._server.redis, self.name)
        resting = sorted(c for c, point in clones.items() if point in below)
        if resting:
            raise InvalidStateError(
                f"Snapshot {name!r} of VM {self.name!r} cannot be deleted: linked clones "
                f"rest on it ({', '.join(resting)})")
        return self._submit(tasks.VM_DELETE_SNAPSHOT,
                            f"Deleting snapshot {name} of VM {self.name}", snapshot=name)

    def clone(self, name: str, linked: bool = False, snapshot: str | None = None,
              host: str | None = None) -> VMTask:
        """A new TurnedOff VM ``name`` with this one's configuration, its own MAC and
        no port forwards.  Full: independent flattened copies of the disks (as now,
        or as at ``snapshot``).  Linked: qcow2 overlays over ``snapshot``'s layers.
        ``host``: another host for a full clone, pulled over the transfer channel
        (TLS when configured); the task returned runs there, and a cancel leaves no
        VM and no file on either host."""
        from api.vms import check_vm_name  # api.vms imports this module

        check_vm_name(name)
        if not isinstance(linked, bool):
            raise InvalidArgumentError("linked must be True or False")
        if snapshot is not None:
            check_snapshot_name(snapshot)
        if linked and snapshot is None:
            raise InvalidArgumentError("A linked clone rests on a snapshot: name one")
        remote = host is not None and validate_host_name(host) != self.host
        if remote and linked:
            raise InvalidArgumentError(
                f"A linked clone stays on its source's host ({self.host}): clone VM "
                f"{self.name!r} onto {host} in full (linked=False)")
        record = self._snapshot_state("clone")
        if snapshot is not None:
            self._existing(record, snapshot)
        elif remote and VMVMState(int(record["state"])) in (VMVMState.Running,
                                                             VMVMState.Paused):
            # Its present changes under a byte copy (the worker refuses it too).
            raise InvalidStateError(
                f"A clone of the present of VM {self.name!r} onto another host while it "
                f"runs is {NOT_YET}: clone it at a snapshot, or turn it off first")
        with broker_errors(self._server.url):
            if self._server.redis.exists(keys.vm_record(name)):
                raise InvalidArgumentError(f"A VM named {name!r} already exists")
        # The clone is new on the host it is made on: none while that is in maintenance.
        self._server.placeable_host(host if remote else self.host,
                                    f"cloning VM {self.name} into {name}")
        kind = "linked" if linked else "full"
        point = f" at snapshot {snapshot}" if snapshot else ""
        if remote:
            assert host is not None
            return self._clone_remote(name, snapshot, host, point)
        return self._submit(tasks.VM_CLONE, f"Cloning VM {self.name}{point} into {name} "
                                            f"({kind})",
                            clone=name, linked=linked, snapshot=snapshot)

    def _clone_remote(self, name: str, snapshot: str | None, host: str, point: str) -> VMTask:
        """Two tasks as for `HardDisk.copy_to`: the source serves the chains, the
        destination (the task returned) pulls them and creates the clone there."""
        target = self._server.resolve_host(host)
        transfer_id, in_id, out_id = (str(uuid.uuid4()) for _ in range(3))
        return submit_peers(
            self._server,
            Peer(tasks.VM_CLONE_OUT,
                 f"Serving VM {self.name}{point} to {target} for the clone {name}",
                 {"name": self.name, "snapshot": snapshot, "destination_host": target,
                  "transfer_id": transfer_id, "client_task_id": in_id},
                 host=self.host, task_id=out_id),
            Peer(tasks.VM_CLONE_IN,
                 f"Cloning VM {self.name}{point} from {self.host} into {name} on {target} "
                 "(full)",
                 {"name": self.name, "clone": name, "snapshot": snapshot,
                  "source_host": self.host, "transfer_id": transfer_id,
                  "server_task_id": out_id},
                 host=target, task_id=in_id))

    def _refuse_with_snapshots(self, record: Mapping[str, str], what: str) -> None:
        """A move carries the tree (cold or live); a linked clone, or a VM that linked
        clones rest on, stays where it is: refused before queueing."""
        if record.get("linked_clone_of"):
            raise InvalidStateError(
                f"Cannot {what} VM {self.name!r}: it is a linked clone, which stays on "
                "its source's host")
        with broker_errors(self._server.url):
            clones = linked_clones(self._server.redis, self.name)
        if clones:
            raise InvalidStateError(
                f"Cannot {what} VM {self.name!r}: linked clones rest on its snapshots "
                f"({', '.join(sorted(clones))})")

    def _refuse_with_clones(self) -> None:
        with broker_errors(self._server.url):
            clones = linked_clones(self._server.redis, self.name)
        if clones:
            raise InvalidStateError(
                f"VM {self.name!r} cannot be deleted: linked clones rest on its snapshots "
                f"({', '.join(sorted(clones))})")
