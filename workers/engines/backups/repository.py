"""A backup repository on disk: a folder under a host's storage root, readable without vmtask.

Layout::

    <repository>/
      index.json                 the index (below): the only list of restore points
      .lock                      flock: one writer (backup, prune), or readers (restore,
                                 verify); the others wait their turn
      <backup id>/
        disk-<i>.qcow2           disk i at that backup; an incremental one is a qcow2
                                 whose backing file is ``../<parent id>/disk-<i>.qcow2``
                                 (relative), so the chain moves with the folder
        vm.json                  the VM's record fields (configuration) at that backup

``index.json``::

    {"version": 1, "id": "<repository uuid hex>",
     "backups": [{"id", "vm", "created", "kind": "full" | "incremental",
                  "parent": id | null, "disks": [the VM's disk paths],
                  "sizes": [virtual size of each disk], "bytes_read", "bytes_written"}]}

oldest first.  A restore is ``qemu-img convert -O qcow2 <id>/disk-<i>.qcow2 out.qcow2``
(qemu-img follows the chain); ``qemu-img compare`` checks it against anything.

Atomicity: a backup is built in ``.<id>.partial/`` and renamed to ``<id>/`` only when
its images are complete, and the index (written to a temporary, fsynced, renamed,
directory fsynced) names it only after that.  A cancelled, failed or killed backup
therefore lists nothing; what it left (a ``.partial`` folder, or a ``<id>/`` folder the
index does not name) is removed by the next writer (`leftovers`).  Prune rewrites
a kept image onto an older parent with a safe ``qemu-img rebase`` (the image reads
the same bytes at every moment), writes the index, and only then removes the folder.
No Celery, no Redis.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from workers.engines.storage import fsync_directory
from workers.failures import IllegalValue

INDEX = "index.json"
LOCK = ".lock"
CONFIG = "vm.json"
VERSION = 1
PARTIAL = ".partial"


@dataclass
class Entry:
    """One restore point."""

    id: str
    vm: str
    created: float
    kind: str
    parent: str | None
    disks: list[str]
    sizes: list[int]
    bytes_read: int = 0
    bytes_written: int = 0


@dataclass
class Index:
    id: str
    backups: list[Entry] = field(default_factory=list)

    def find(self, backup_id: str) -> Entry | None:
        return next((b for b in self.backups if b.id == backup_id), None)

    def require(self, backup_id: str) -> Entry:
        entry = self.find(backup_id)
        if entry is None:
            raise IllegalValue(f"The repository has no backup {backup_id!r}")
        return entry

    def latest(self, vm: str) -> Entry | None:
        mine = [b for b in self.backups if b.vm == vm]
        return mine[-1] if mine else None

    def chain(self, backup_id: str) -> list[Entry]:
        """The backup and every parent it needs, nearest first."""
        found: list[Entry] = []
        current: str | None = backup_id
        while current is not None:
            entry = self.require(current)
            found.append(entry)
            current = entry.parent
        return found

    def children(self, backup_id: str) -> list[Entry]:
        return [b for b in self.backups if b.parent == backup_id]

    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, "id": self.id, "backups": [asdict(b) for b in self.backups]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Index:
        if data.get("version") != VERSION:
            raise IllegalValue(f"Unknown backup index version {data.get('version')!r}")
        return cls(id=str(data["id"]), backups=[Entry(**b) for b in data["backups"]])


def new_backup_id() -> str:
    """Sortable by time (UTC, to the second), unique by a random tail."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def load(folder: Path) -> Index:
    """The repository's index; a new, empty one (not yet written) for a new folder."""
    try:
        text = (folder / INDEX).read_text()
    except FileNotFoundError:
        return Index(id=uuid.uuid4().hex)
    try:
        return Index.from_json(json.loads(text))
    except (ValueError, KeyError, TypeError) as exc:
        raise IllegalValue(f"The backup index {folder / INDEX} is unreadable: {exc}") from None


def store(folder: Path, index: Index) -> None:
    """Replace the index atomically and durably."""
    folder.mkdir(parents=True, exist_ok=True)
    temp = folder / f".{INDEX}.tmp"
    with open(temp, "w") as handle:
        json.dump(index.to_json(), handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, folder / INDEX)
    fsync_directory(folder, strict=True)


@contextmanager
def locked(folder: Path, *, exclusive: bool, pause: Callable[[], None] | None = None
           ) -> Iterator[None]:
    """Hold the repository's lock.  While another task holds it: ``pause()`` and try
    again (the caller's wait, which may raise to give up: a cancel), or without
    ``pause`` `IllegalValue` at once."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if pause is None:
                    raise IllegalValue(f"The backup repository {folder.name} is in use by "
                                       "another task") from None
                pause()
        yield
    finally:
        os.close(fd)


def backup_folder(folder: Path, backup_id: str) -> Path:
    return folder / backup_id


def partial_folder(folder: Path, backup_id: str) -> Path:
    return folder / f".{backup_id}{PARTIAL}"


def disk_name(index: int) -> str:
    return f"disk-{index}.qcow2"


def disk_file(folder: Path, backup_id: str, index: int) -> Path:
    return backup_folder(folder, backup_id) / disk_name(index)


def parent_backing(parent_id: str, index: int) -> str:
    """The backing name an incremental image stores: relative, so the folder can move."""
    return f"../{parent_id}/{disk_name(index)}"


def leftovers(folder: Path, index: Index) -> list[Path]:
    """What a cancelled or crashed writer left: folders the index does not name."""
    if not folder.is_dir():
        return []
    named = {b.id for b in index.backups}
    return [path for path in folder.iterdir()
            if path.is_dir() and path.name not in named]


def remove_leftovers(folder: Path, index: Index) -> list[str]:
    removed = []
    for path in leftovers(folder, index):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


def publish_backup(folder: Path, backup_id: str) -> None:
    """``.<id>.partial/`` becomes ``<id>/`` (still unlisted until the index names it)."""
    os.replace(partial_folder(folder, backup_id), backup_folder(folder, backup_id))
    fsync_directory(folder, strict=True)


def size_on_host(folder: Path, backup_id: str) -> int:
    total = 0
    target = backup_folder(folder, backup_id)
    if target.is_dir():
        for path in target.iterdir():
            total += os.stat(path).st_blocks * 512
    return total


def public_view(folder: Path, index: Index) -> list[dict[str, Any]]:
    """What `api.backups.Backup` shows, oldest first."""
    return [{"id": b.id, "vm": b.vm, "created": b.created, "kind": b.kind, "parent": b.parent,
             "size_on_host": size_on_host(folder, b.id), "disks": b.disks}
            for b in index.backups]
