"""Backups as Celery tasks: `vm.backup` into a repository on the VM's host.

The body takes the VM's lock (a start, stop or move waits for it, then is refused
as busy), then the repository's (one writer at a time), and reads the disks through
QEMU's backup job (`workers.engines.backups.job`): the VM's own QEMU when it runs,
else a ``qemu-storage-daemon`` over the confined, pinned chains.  The order that
makes a failure at any point harmless:

1. leftovers of earlier failed backups are removed (folders the index does not name,
   this repository's bitmaps other than the parent's);
2. the new backup's images are written in ``.<id>.partial/``, and the job adds a new
   bitmap named for it in the same QMP transaction that starts the copy;
3. the folder is renamed to ``<id>/``, then the index names it (the commit point);
4. only then is the previous backup's bitmap removed (kept until then even by a full
   backup, which may fail too).

Each repository a host holds is remembered by a marker file in ``.backups/`` under
the root, so a worker starting removes what a killed backup left in every repository
and writes each listing into Redis again (`recover_repositories`): the folder is the
authority, Redis may have lost the last write.

A cancel or failure before 3 removes the partial folder and the new bitmap; the
parent's bitmap is untouched, so the next backup is still incremental.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import redis

from api.enums import VMVMState as S
from api.errors import InvalidStateError
from api.protocol import keys, tasks
from api.protocol.backups import LAST_BACKUP_FIELD, listing_key
from api.settings import Settings
from workers.engines.backups import job
from workers.engines.backups import repository as repo
from workers.engines.context import ProgressSpan, raise_if_cancelled
from workers.engines.files import HostFiles
from workers.engines.qemu_vm.monitor import Monitor
from workers.engines.storage import fsync_directory
from workers.failures import IllegalValue
from workers.runtime import TaskRun, operation
from workers.tasks.snapshots import disks_of
from workers.tasks.vms import begin, open_vm_files, paths_of, vm_lock

log = logging.getLogger(__name__)

LIVE = frozenset({S.Running, S.Paused})
# Record fields a restore gives the new VM (the rest is the restore's own).
CONFIG_FIELDS = ("memory_mb", "cpus", "network", "guest_agent", "kernel", "initrd", "append")
DAEMON_FOLDER = ".backup"
REGISTRY = ".backups"


def repository_folder(settings: Settings, repository: object) -> Path:
    """The repository's folder, confined to the root; not inside a VM's folder (which
    goes with the VM), not under a hidden folder (the host's internals: locks, the
    registry of repositories), and not the root itself."""
    if not isinstance(repository, str) or not repository:
        raise IllegalValue(f"Invalid repository {repository!r}")
    files = HostFiles.of(settings)
    folder = files.resolve(repository)
    relative = folder.relative_to(files.root)
    if not relative.parts or relative.parts[0] == "vms" or relative.parts[0].startswith("."):
        raise IllegalValue(f"The repository {repository!r} must be a folder of its own under "
                           "the storage root, outside vms/ and hidden folders")
    if folder.exists() and not folder.is_dir():
        raise IllegalValue(f"The repository {repository!r} is not a folder")
    return folder


def waiting(run: TaskRun, folder: Path) -> Callable[[], None]:
    """How a task waits for a repository another task holds: cancelably, logged once."""
    logged = False

    def pause() -> None:
        nonlocal logged
        if not logged:
            run.log(f"waiting for the repository {folder.name}: another task holds it")
            logged = True
        run.sleep(0.2)
    return pause


def remember(settings: Settings, repository: str) -> None:
    """Mark ``repository`` as one this host holds (one file each: no shared write)."""
    registry = HostFiles.of(settings).root / REGISTRY
    registry.mkdir(exist_ok=True)
    marker = registry / hashlib.sha256(repository.encode()).hexdigest()[:32]
    if not marker.exists():
        temp = marker.with_suffix(".tmp")
        temp.write_text(repository)
        os.replace(temp, marker)


def recover_repositories(client: redis.Redis, settings: Settings) -> None:
    """At a worker's start (nothing runs yet): in every repository of this host,
    remove what unfinished backups left, and write its listing into Redis again."""
    registry = HostFiles.of(settings).root / REGISTRY
    if not registry.is_dir():
        return
    for marker in sorted(registry.iterdir()):
        try:
            repository = marker.read_text()
            folder = repository_folder(settings, repository)
            if not (folder / repo.INDEX).exists():
                continue
            with repo.locked(folder, exclusive=True):
                index = repo.load(folder)
                for leftover in repo.remove_leftovers(folder, index):
                    log.warning("Removed %s from the repository %s: what an unfinished "
                                "backup left", leftover, repository)
                publish_listing(client, settings, repository, folder, index)
        except Exception as exc:  # noqa: BLE001  one repository cannot stop the start
            log.error("Could not recover the backup repository of %s: %s", marker, exc)


def publish_listing(client: redis.Redis, settings: Settings, repository: str,
                    folder: Path, index: repo.Index) -> None:
    client.hset(listing_key(settings.host), repository,
                json.dumps(repo.public_view(folder, index)))


def _plan(index: repo.Index, name: str, disks: list[str], sizes: list[int],
          found: list[dict[str, dict[str, Any]]], full: bool
          ) -> tuple[repo.Entry | None, str]:
    """The parent (None: a full backup) and the reason for the kind."""
    parent = index.latest(name)
    if parent is None:
        return None, "the first backup of this VM in the repository"
    if full:
        return None, "a full backup was asked for"
    if parent.disks != disks:
        return None, (f"the VM's disks changed since backup {parent.id} "
                      f"({parent.disks} -> {disks})")
    if parent.sizes != sizes:
        return None, f"a disk was resized since backup {parent.id}"
    problem = job.chain_problem(found, job.bitmap_name(index.id, parent.id))
    if problem is not None:
        return None, problem
    return parent, f"incremental since backup {parent.id}"


@operation(tasks.VM_BACKUP)
def backup(run: TaskRun, name: str, repository: str, full: bool) -> dict[str, Any]:
    folder = repository_folder(run.settings, repository)
    # The repository first: waiting for another VM's backup there must not hold this
    # VM's lock (its start or stop would wait too).  Nothing takes them the other way.
    with repo.locked(folder, exclusive=True, pause=waiting(run, folder)), \
            vm_lock(run, name), ExitStack() as stack:
        client, record, state = begin(run, name, None)
        if record.get("undoable") == "1":
            raise InvalidStateError(f"VM {name!r} is undoable: backups of undo disks are not "
                                    "supported yet")
        if not disks_of(record):
            raise IllegalValue(f"VM {name!r} has no disks to back up")
        index = repo.load(folder)
        remember(run.settings, repository)
        for leftover in repo.remove_leftovers(folder, index):
            run.log(f"removed {leftover}: what an unfinished backup left")
        paths = paths_of(run.settings, name)
        daemon: job.StorageDaemon | None = None
        if state in LIVE:
            monitor = stack.enter_context(Monitor(paths))
            job.clear_stale_jobs(monitor)
        else:
            opened = open_vm_files(run, record, paths, stack)
            daemon = job.StorageDaemon(paths.directory / DAEMON_FOLDER,
                                       [d.node() for d in opened.drives], opened.fds)
            monitor = daemon.monitor
        try:
            output = _backup(run, monitor, folder, index, record, full is True)
        except BaseException:
            if daemon is not None:
                try:
                    daemon.stop()
                except Exception:  # noqa: BLE001  the first failure is the one to tell
                    daemon.kill()
            raise
        if daemon is not None:
            daemon.stop()
        publish_listing(client, run.settings, repository, folder, index)
        client.hset(keys.vm_record(name), LAST_BACKUP_FIELD, repr(time.time()))
        return output


def _backup(run: TaskRun, monitor: Monitor, folder: Path, index: repo.Index,
            record: dict[str, str], full: bool) -> dict[str, Any]:
    name = record["name"]
    disks = disks_of(record)
    count = len(disks)
    sizes = job.virtual_sizes(monitor, count)
    parent, reason = _plan(index, name, disks, sizes, job.bitmaps(monitor, count), full)
    since = job.bitmap_name(index.id, parent.id) if parent is not None else None
    # The last listed backup's bitmap stays even when this one is full: if this one
    # fails, the next is still incremental against that backup.
    latest = index.latest(name)
    keep = job.bitmap_name(index.id, latest.id) if latest is not None else None
    for stale in job.remove_bitmaps(monitor, count, job.bitmap_prefix(index.id), keep):
        run.log(f"removed the stale bitmap {stale}")
    kind = "incremental" if parent is not None else "full"
    run.log(f"{kind} backup: {reason}")
    backup_id = repo.new_backup_id()
    partial = repo.partial_folder(folder, backup_id)
    partial.mkdir(parents=True)
    try:
        plans = []
        for i in range(count):
            target = partial / repo.disk_name(i)
            backing = repo.parent_backing(parent.id, i) if parent is not None else None
            job.create_target(target, sizes[i], backing, run)
            plans.append(job.DiskJob(i, target, "bitmap" if parent else "full",
                                     since, job.bitmap_name(index.id, backup_id)))
        (partial / repo.CONFIG).write_text(json.dumps(
            {k: record[k] for k in (*CONFIG_FIELDS, "disks", "name") if k in record}))
        read = job.run_backup(monitor, plans, run, ProgressSpan(run, 1, 97),
                              run.settings.backup_max_bandwidth)
        for path in partial.iterdir():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(partial)
        written = sum(os.stat(p).st_blocks * 512 for p in partial.iterdir())
        raise_if_cancelled(run)
        repo.publish_backup(folder, backup_id)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    entry = repo.Entry(id=backup_id, vm=name, created=time.time(), kind=kind,
                       parent=parent.id if parent else None, disks=disks, sizes=sizes,
                       bytes_read=read, bytes_written=written)
    index.backups.append(entry)
    repo.store(folder, index)  # the commit point: the restore point exists
    run.log(f"backup {backup_id} listed: {read} bytes read, {written} written")
    if keep is not None:  # the backup counted from until now
        job.remove_bitmaps(monitor, count, job.bitmap_prefix(index.id),
                           job.bitmap_name(index.id, backup_id))
    run.report_progress(100)
    return {"id": backup_id, "vm": name, "kind": kind, "parent": entry.parent,
            "bytes_read": read, "bytes_written": written, "disks": disks, "reason": reason}


def restore_config(folder: Path, backup_id: str) -> dict[str, str]:
    data: dict[str, str] = json.loads(
        (repo.backup_folder(folder, backup_id) / repo.CONFIG).read_text())
    return data
