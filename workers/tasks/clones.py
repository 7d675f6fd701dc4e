"""Cloning a VM on its own host: full (flattened copies) or linked.

The clone's disks live in its own directory, ``vms/<clone>/disks/``, and go with it
when it is deleted.  A full clone is ``qemu-img convert`` of each disk's whole chain
(the present, or a snapshot's layer, down to the base) into a new qcow2; a linked
clone is a qcow2 overlay over a snapshot's layer, which stays read-only while the
clone rests on it (its record's ``linked_clone_of`` says so, and deleting that
snapshot, a snapshot above it, or the source VM is refused).  The clone gets the
source's CPUs, memory, network, kernel and flags, its own MAC and no port forwards.

The record is created last, atomically (`vm_create.lua`), so a cancelled or failed
clone leaves no VM; its files are removed.  ``vms/<clone>/clone.json`` marks a clone
under way: a worker starting finds those its predecessor left and removes them.

A Running or Paused source is not stopped: a clone of its present is copied by its
QEMU (`livesnap.copy_out`, crash-consistent), one of a snapshot reads the snapshot's
read-only layers as for a stopped source.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import redis

from api.enums import VMVMState as S
from api.protocol import keys, tasks
from api.protocol.snapshots import CLONE_FIELD
from api.scripts import Scripts
from api.settings import Settings
from api.vmargs import new_mac, to_args
from api.vms import VM_NAME_PATTERN
from workers.engines import qemu_img, qemu_vm
from workers.engines import snapshots as engine
from workers.engines.context import raise_if_cancelled, scaled
from workers.engines.files import HostFiles
from workers.engines.qemu_vm import livesnap
from workers.failures import IllegalValue
from workers.runtime import TaskRun, operation
from workers.tasks.snapshots import check_snapshot_name, disks_of, vm_directory
from workers.tasks.vms import begin, config_of, paths_of, vm_lock

log = logging.getLogger(__name__)

JOURNAL = "clone.json"
COPIED_FIELDS = ("memory_mb", "cpus", "network", "undoable", "guest_agent", "kernel",
                 "initrd", "append")


def source_tops(run: TaskRun, record: dict[str, str], snapshot: str | None) -> list[Path]:
    """The top of each of the source's disk chains: a snapshot's layer, or what the
    VM runs on now (its present, its undo overlay, or the base)."""
    name = record["name"]
    folder = vm_directory(run.settings, name)
    tree = engine.load(folder)
    disks = disks_of(record)
    if snapshot is not None:
        if tree is None or tree.find(snapshot) is None:
            raise IllegalValue(f"VM {name!r} has no snapshot named {snapshot!r}")
        return engine.snapshot_disks(folder, tree, snapshot, len(disks))
    files = HostFiles.of(run.settings)
    tops = [Path(p) for p in config_of(run.settings, record).disks]
    return [top if top.exists() else files.resolve(disk, must_exist=True)
            for top, disk in zip(tops, disks, strict=True)]


@operation(tasks.VM_CLONE)
def clone(run: TaskRun, name: str, clone: str, linked: bool,
          snapshot: str | None) -> dict[str, Any]:
    if not isinstance(clone, str) or not VM_NAME_PATTERN.fullmatch(clone):
        raise IllegalValue(f"Invalid VM name {clone!r}")
    if snapshot is not None:
        check_snapshot_name(snapshot)
    if linked and snapshot is None:
        raise IllegalValue("A linked clone rests on a snapshot: name one")
    with vm_lock(run, name):
        client, record, state = begin(run, name, None)
        if client.exists(keys.vm_record(clone)):
            raise IllegalValue(f"A VM named {clone!r} already exists")
        tops = source_tops(run, record, snapshot)
        directory = paths_of(run.settings, clone).directory
        target = directory / "disks"
        if target.exists() or (directory / JOURNAL).exists():
            raise IllegalValue(f"{HostFiles.of(run.settings).relative(target)} already exists")
        target.mkdir(parents=True)
        (directory / JOURNAL).write_text(json.dumps({"task": run.task_id, "source": name}))
        try:
            if state in (S.Running, S.Paused) and snapshot is None:
                disks = _copy_running(run, name, tops, target)
            else:  # a snapshot's layers do not change while the VM runs
                disks = _make_disks(run, tops, target, linked)
            raise_if_cancelled(run)
            fields = record_fields(run, record, clone, disks)
            if linked:
                fields[CLONE_FIELD] = json.dumps({"vm": name, "snapshot": snapshot})
            # The host's VM set too: its watch and its restart's recovery read it.
            created = Scripts.of(client).vm_create(record=keys.vm_record(clone),
                                                   names=keys.VM_NAMES,
                                                   host_vms=keys.host_vms(run.settings.host),
                                                   name=clone, fields=to_args(fields))
            if not created:
                raise IllegalValue(f"A VM named {clone!r} already exists")
        except BaseException:
            remove_clone(directory)
            raise
        (directory / JOURNAL).unlink()
        return {"name": clone, "source": name, "linked": linked, "snapshot": snapshot,
                "disks": json.loads(fields["disks"]), "mac": fields["mac"]}


def _make_disks(run: TaskRun, tops: list[Path], target: Path, linked: bool) -> list[Path]:
    files = HostFiles.of(run.settings)
    made: list[Path] = []
    for index, top in enumerate(tops):
        share = scaled(run, 95 * index / len(tops), 95 * (index + 1) / len(tops))
        destination = target / f"{index}-{top.stem}.qcow2"
        with ExitStack() as stack:
            chain = files.open_chain(top, stack)
            if linked:
                qemu_img.create_differencing(destination, top, share,
                                             parent_info=chain.links[0].info)
            else:
                qemu_img.convert(top, destination, False, share,
                                 chain=chain.pinned(), source_info=chain.links[0].info)
        made.append(destination)
    return made


def _copy_running(run: TaskRun, name: str, tops: list[Path], target: Path) -> list[Path]:
    """A running source's disks as of one instant, copied by QEMU while the guest
    runs on (crash-consistent, as a power cut would leave them)."""
    paths = paths_of(run.settings, name)
    made = [target / f"{index}-{top.stem}.qcow2" for index, top in enumerate(tops)]
    with qemu_vm.connect(paths) as monitor:
        sizes = livesnap.virtual_sizes(monitor, len(tops))
        for path, size in zip(made, sizes, strict=True):
            qemu_img.create_dynamic(path, size, scaled(run, 0, 0))
        livesnap.copy_out(monitor, made, engine.new_layer_id(), scaled(run, 0, 95))
    return made


def record_fields(run: TaskRun, record: dict[str, str], clone: str, disks: list[Path]
                   ) -> dict[str, str]:
    files = HostFiles.of(run.settings)
    fields = {key: record[key] for key in COPIED_FIELDS if key in record}
    fields.update({
        "name": clone, "host": run.settings.host, "state": str(int(S.TurnedOff)),
        "disks": json.dumps([files.relative(disk) for disk in disks]),
        "port_forwards": "[]", "mac": new_mac(), "created": repr(time.time()),
    })
    return fields


def remove_clone(directory: Path) -> None:
    shutil.rmtree(directory / "disks", ignore_errors=True)
    try:
        (directory / JOURNAL).unlink()
    except FileNotFoundError:
        pass
    try:
        directory.rmdir()  # only when nothing else is in it
    except OSError:
        pass


def remove_unfinished_clones(client: redis.Redis, settings: Settings) -> None:
    """At a worker's start (nothing runs yet): a clone whose journal is still there
    never got its record, or got it just before the crash."""
    vms = HostFiles.of(settings).root / "vms"
    if not vms.is_dir():
        return
    for journal in vms.glob(f"*/{JOURNAL}"):
        directory = journal.parent
        if client.exists(keys.vm_record(directory.name)):
            os.unlink(journal)
            continue
        log.warning("Removing the unfinished clone %s", directory.name)
        remove_clone(directory)
