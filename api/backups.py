"""Backups, producer side: `Backup`, `VirtualMachine.backup` and the `VirtualServer`
methods (mixins), each checked before anything is queued.

A repository is a folder under a host's storage root (a path relative to it, not
under ``vms/``); so far it lives on the VM's host, and a restore makes its VM on the
repository's host (another host is refused with `InvalidStateError`: not supported
yet).  `VirtualServer.backups` reads the listing the repository's worker mirrors
into Redis after every change, so it needs no task.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from api.arguments import check_int, check_relative_path
from api.errors import InvalidArgumentError, InvalidStateError
from api.protocol import hresults, keys, tasks
from api.protocol.backups import BACKUP_ID, listing
from api.protocol.vmstate import ALLOWED
from api.store import broker_errors

if TYPE_CHECKING:
    from api.core import ServerCore
    from api.enums import VMVMState
    from api.task import VMTask

NOT_YET = "not supported yet"
MAX_KEEP = 10_000


@dataclass(frozen=True)
class Backup:
    """One restore point of a repository (oldest first in `VirtualServer.backups`)."""

    id: str
    vm: str
    created: float
    kind: str
    """"full" or "incremental"."""
    parent: str | None
    size_on_host: int
    disks: tuple[str, ...]
    """The VM's disk paths at that backup."""


def check_repository(repository: object) -> str:
    """A folder under the storage root, outside ``vms/`` (which goes with its VMs) and
    hidden folders (the host's internals)."""
    if not isinstance(repository, str):
        raise InvalidArgumentError(f"Invalid repository {repository!r}: a path relative to "
                                   "the storage root")
    check_relative_path(repository, "repository")
    parts = [p for p in PurePosixPath(repository).parts if p != "."]
    if not parts or parts[0] == "vms" or parts[0].startswith("."):
        raise InvalidArgumentError(
            f"Invalid repository {repository!r}: a folder of its own under the storage root, "
            "outside vms/ and hidden folders", hresults.ACCESS_DENIED)
    return repository


def check_backup_id(backup_id: object) -> str:
    if not isinstance(backup_id, str) or not BACKUP_ID.fullmatch(backup_id):
        raise InvalidArgumentError(f"Invalid backup id {backup_id!r}")
    return backup_id


class BackupVMMethods:
    """`VirtualMachine.backup`."""

    name: str
    host: str
    undoable: bool
    _server: ServerCore

    if TYPE_CHECKING:
        def _read(self) -> tuple[dict[str, str], VMVMState]: ...

    def backup(self, repository: str, host: str | None = None, full: bool = False) -> VMTask:
        """Back the VM's disks up into ``repository`` on ``host`` (default: the VM's).
        The first backup of a VM in a repository is full, later ones incremental
        (only what changed since the last one there), unless ``full`` or the change
        tracking cannot be trusted; the output says which and why.  Any state but a
        transitional one: a running guest keeps running.  Cancelable: a cancelled or
        failed backup leaves the repository as it was."""
        check_repository(repository)
        if not isinstance(full, bool):
            raise InvalidArgumentError("full must be True or False")
        if host is not None and host != self.host:
            raise InvalidStateError(f"A repository on another host than the VM's ({host}) is "
                                    f"{NOT_YET}")
        if self.undoable:
            raise InvalidStateError(f"VM {self.name!r} is undoable: backups of undo disks are "
                                    f"{NOT_YET}")
        record, state = self._read()
        if state not in ALLOWED["backup"]:
            raise InvalidStateError(f"Cannot back up VM {self.name!r} while it is {state.name}")
        if record.get("disks", "[]") == "[]":
            raise InvalidArgumentError(f"VM {self.name!r} has no disks to back up")
        kind = "full" if full else "incremental when possible"
        return self._server.submit(
            tasks.VM_BACKUP, description=f"Backing up VM {self.name} into {repository} ({kind})",
            kwargs={"name": self.name, "repository": repository, "full": full}, host=self.host)


class BackupOperations:
    """`VirtualServer`'s repository operations."""

    if TYPE_CHECKING:
        url: str
        redis: Any

        def resolve_host(self, host: str | None = None) -> str: ...

        def submit(self, task: tasks.TaskSpec, *, description: str,
                   kwargs: dict[str, Any], host: str | None) -> VMTask: ...

    def backups(self, repository: str, host: str | None = None) -> list[Backup]:
        """The restore points of ``repository`` on ``host``, oldest first; no task."""
        check_repository(repository)
        target = self.resolve_host(host)
        with broker_errors(self.url):
            entries = listing(self.redis, target, repository)
        return [Backup(id=b["id"], vm=b["vm"], created=float(b["created"]), kind=b["kind"],
                       parent=b["parent"], size_on_host=int(b["size_on_host"]),
                       disks=tuple(b["disks"])) for b in entries]

    def _existing_backup(self, repository: str, backup_id: str, host: str) -> None:
        if backup_id not in [b.id for b in self.backups(repository, host)]:
            raise InvalidArgumentError(
                f"The repository {repository!r} on {host} has no backup {backup_id!r}")

    def restore_backup(self, repository: str, backup_id: str, name: str,
                       host: str | None = None, repository_host: str | None = None) -> VMTask:
        """A new TurnedOff VM ``name`` whose disks read what the backed-up VM's held at
        that backup, with its configuration (its own MAC, no port forwards)."""
        from api.vms import check_vm_name  # api.vms imports this module

        check_repository(repository)
        check_backup_id(backup_id)
        check_vm_name(name)
        source = self.resolve_host(repository_host or host)
        if host is not None and host != source:
            raise InvalidStateError(f"Restoring onto another host than the repository's "
                                    f"({host}) is {NOT_YET}")
        self._existing_backup(repository, backup_id, source)
        with broker_errors(self.url):
            if self.redis.exists(keys.vm_record(name)):
                raise InvalidArgumentError(f"A VM named {name!r} already exists")
        return self.submit(tasks.BACKUP_RESTORE,
                           description=f"Restoring backup {backup_id} of {repository} as VM "
                                       f"{name}",
                           kwargs={"repository": repository, "backup_id": backup_id,
                                   "name": name}, host=source)

    def prune_backups(self, repository: str, keep_last: int, host: str | None = None
                      ) -> VMTask:
        """Keep the newest ``keep_last`` restore points of each VM in ``repository``;
        the older ones go, their data merged into what the kept ones need."""
        check_repository(repository)
        check_int("keep_last", keep_last, 1, MAX_KEEP)
        target = self.resolve_host(host)
        return self.submit(tasks.BACKUP_PRUNE,
                           description=f"Pruning {repository} to the newest {keep_last} "
                                       "backups of each VM",
                           kwargs={"repository": repository, "keep_last": keep_last},
                           host=target)

    def verify_backup(self, repository: str, backup_id: str, host: str | None = None
                      ) -> VMTask:
        """Restore into a scratch VM without network, boot it until its guest agent
        answers (without an agent: until it has run 10 s), keep a screenshot in the
        output (``screenshot_png_base64``) and remove the scratch VM."""
        check_repository(repository)
        check_backup_id(backup_id)
        target = self.resolve_host(host)
        self._existing_backup(repository, backup_id, target)
        return self.submit(tasks.BACKUP_VERIFY,
                           description=f"Verifying backup {backup_id} of {repository} by "
                                       "booting it",
                           kwargs={"repository": repository, "backup_id": backup_id},
                           host=target)
