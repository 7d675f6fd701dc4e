"""Restoring and pruning a backup repository, as Celery tasks on its host.

Restore: each disk is ``qemu-img convert`` of its backup chain (confined and pinned,
as every chain qemu opens) into ``vms/<name>/disks/``, and the VM record comes last,
atomically; until then a clone's journal marks the folder, so a cancelled, failed or
killed restore leaves no VM and its files go (`workers.tasks.clones`).

Prune: an old restore point goes after each image resting on it has been rebased
onto its parent (safe ``qemu-img rebase``: the image reads the same bytes at every
moment, so a cancel or a crash half-way changes no restore point), then the index
stops naming it, then its folder is removed.  The newest backup of a VM always
stays, so the VM's dirty bitmap keeps counting from a listed backup.
"""

from __future__ import annotations

import json
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from api.protocol import keys, tasks
from api.scripts import Scripts
from api.vmargs import new_mac, to_args
from api.vms import VM_NAME_PATTERN
from workers.engines import qemu_img
from workers.engines.backups import repository as repo
from workers.engines.context import raise_if_cancelled, scaled
from workers.engines.files import HostFiles
from workers.engines.qemu_img.runner import run_qemu_img
from workers.failures import IllegalValue
from workers.runtime import TaskRun, operation
from workers.tasks.backups import CONFIG_FIELDS, publish_listing, repository_folder, waiting
from workers.tasks.clones import JOURNAL, remove_clone
from workers.tasks.vms import paths_of


@operation(tasks.BACKUP_RESTORE)
def restore_backup(run: TaskRun, repository: str, backup_id: str, name: str
                   ) -> dict[str, Any]:
    if not isinstance(name, str) or not VM_NAME_PATTERN.fullmatch(name):
        raise IllegalValue(f"Invalid VM name {name!r}")
    folder = repository_folder(run.settings, repository)
    client = run.redis
    if client.exists(keys.vm_record(name)):
        raise IllegalValue(f"A VM named {name!r} already exists")
    with repo.locked(folder, exclusive=False, pause=waiting(run, folder)):
        index = repo.load(folder)
        entry = index.require(backup_id)
        config: dict[str, str] = json.loads(
            (repo.backup_folder(folder, backup_id) / repo.CONFIG).read_text())
        directory = paths_of(run.settings, name).directory
        target = directory / "disks"
        files = HostFiles.of(run.settings)
        if target.exists() or (directory / JOURNAL).exists():
            raise IllegalValue(f"{files.relative(target)} already exists")
        target.mkdir(parents=True)
        (directory / JOURNAL).write_text(json.dumps({"task": run.task_id,
                                                     "source": f"backup {backup_id}"}))
        try:
            disks = restore_disks(run, folder, entry, target, (0, 95))
            raise_if_cancelled(run)
            fields = {key: config[key] for key in CONFIG_FIELDS if key in config}
            fields.update({
                "name": name, "host": run.settings.host, "state": "1", "undoable": "0",
                "disks": json.dumps([files.relative(d) for d in disks]),
                "port_forwards": "[]", "mac": new_mac(), "created": repr(entry.created),
            })
            # The host's VM set too: its watch and its restart's recovery read it.
            if not Scripts.of(client).vm_create(
                    record=keys.vm_record(name), names=keys.VM_NAMES,
                    host_vms=keys.host_vms(run.settings.host), name=name,
                    fields=to_args(fields)):
                raise IllegalValue(f"A VM named {name!r} already exists")
        except BaseException:
            remove_clone(directory)
            raise
    (directory / JOURNAL).unlink()
    return {"name": name, "backup": backup_id, "vm": entry.vm,
            "disks": json.loads(fields["disks"])}


def restore_disks(run: TaskRun, folder: Path, entry: repo.Entry, target: Path,
                  span: tuple[float, float]) -> list[Path]:
    """Each disk's backup chain converted into a new qcow2 in ``target``."""
    files = HostFiles.of(run.settings)
    made = []
    count = len(entry.disks)
    low, high = span
    for index in range(count):
        source = repo.disk_file(folder, entry.id, index)
        destination = target / f"{index}-{Path(entry.disks[index]).stem}.qcow2"
        with ExitStack() as stack:
            chain = files.open_chain(source, stack)
            qemu_img.convert(source, destination, False,
                             scaled(run, low + (high - low) * index / count,
                                    low + (high - low) * (index + 1) / count),
                             chain=chain.pinned(),
                             source_info=chain.links[0].info)
        made.append(destination)
    return made


@operation(tasks.BACKUP_PRUNE)
def prune_backups(run: TaskRun, repository: str, keep_last: int) -> dict[str, Any]:
    if not isinstance(keep_last, int) or keep_last < 1:
        raise IllegalValue(f"keep_last must be at least 1, not {keep_last!r}")
    folder = repository_folder(run.settings, repository)
    with repo.locked(folder, exclusive=True, pause=waiting(run, folder)):
        index = repo.load(folder)
        repo.remove_leftovers(folder, index)
        doomed: list[str] = []
        for vm in sorted({b.vm for b in index.backups}):
            mine = [b.id for b in index.backups if b.vm == vm]
            doomed += mine[:-keep_last]
        for number, backup_id in enumerate(doomed):
            _drop(run, folder, index, backup_id,
                  (95 * number / len(doomed), 95 * (number + 1) / len(doomed)))
        publish_listing(run.redis, run.settings, repository, folder, index)
    run.report_progress(100)
    return {"removed": doomed, "kept": [b.id for b in index.backups]}


def _drop(run: TaskRun, folder: Path, index: repo.Index, backup_id: str,
          span: tuple[float, float]) -> None:
    entry = index.require(backup_id)
    children = index.children(backup_id)
    files = HostFiles.of(run.settings)
    low, high = span
    steps = max(1, len(children) * len(entry.disks))
    step = 0
    for child in children:
        for disk in range(len(entry.disks)):
            image = repo.disk_file(folder, child.id, disk)
            with ExitStack() as stack:
                files.open_chain(image, stack)  # the chain must stay in the root
            backing = repo.parent_backing(entry.parent, disk) if entry.parent else ""
            args = ["rebase", "-p", "-f", "qcow2"]
            if backing:
                args += ["-F", "qcow2"]
            run_qemu_img([*args, "-b", backing, str(image)], run, progress_range=(
                low + (high - low) * step / steps, low + (high - low) * (step + 1) / steps))
            step += 1
    raise_if_cancelled(run)
    for child in children:
        child.parent = entry.parent
        if entry.parent is None:
            child.kind = "full"
    index.backups = [b for b in index.backups if b.id != backup_id]
    repo.store(folder, index)
    shutil.rmtree(repo.backup_folder(folder, backup_id), ignore_errors=True)
    run.log(f"removed backup {backup_id}")
