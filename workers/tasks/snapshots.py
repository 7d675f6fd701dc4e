"""Snapshots as Celery tasks: create, revert and delete (a running VM's: `snapshots_live`).

Each body takes the VM's lock (`workers.tasks.vms.vm_lock`), re-checks the state
the producer checked, works on the layers through `workers.engines.snapshots`, and
then mirrors the tree into the VM's record for producers.  Where the tree lives:
the file beside the layers is the authority (it changes with the files, under the
same lock, in an order that a crash cannot make lie), and the record's copy is
rewritten from it after every change and by every worker start (`recover`), so a
Redis that lost its last writes, or a worker killed between the two writes, is put
right by the next start.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import redis

from api.enums import VMVMState as S
from api.errors import InvalidStateError
from api.protocol import keys, tasks
from api.protocol.snapshots import SNAPSHOT_NAME, TREE_FIELD, linked_clones
from api.scripts import Scripts
from api.settings import Settings
from workers.engines import qemu_img, qemu_vm
from workers.engines import snapshots as engine
from workers.engines.context import raise_if_cancelled, scaled
from workers.engines.files import HostFiles
from workers.engines.qemu_vm.config import config_fingerprint, fingerprint_path
from workers.engines.storage import fsync_directory, remove_quietly, temporary_path_for
from workers.failures import Cancelled, IllegalValue
from workers.runtime import TaskRun, operation
from workers.tasks import snapshots_live
from workers.tasks.vms import (
    begin,
    config_of,
    host_vms,
    paths_of,
    settle,
    transition,
    try_lock,
    vm_lock,
)

log = logging.getLogger(__name__)



def check_snapshot_name(snapshot: object) -> str:
    if not isinstance(snapshot, str) or not SNAPSHOT_NAME.fullmatch(snapshot):
        raise IllegalValue(f"Invalid snapshot name {snapshot!r}: 1-64 of A-Z a-z 0-9 . _ -")
    return snapshot


def vm_directory(settings: Settings, name: str) -> Path:
    return paths_of(settings, name).directory


def publish(client: redis.Redis, name: str, folder: Path, tree: engine.Tree | None) -> None:
    client.hset(keys.vm_record(name), TREE_FIELD,
                json.dumps(engine.public_view(folder, tree)))


def disks_of(record: dict[str, str]) -> list[str]:
    disks: list[str] = json.loads(record["disks"])
    return disks


def checked_bases(run: TaskRun, record: dict[str, str], tree: engine.Tree | None
                  ) -> tuple[list[Path], list[qemu_img.DiskInfo]]:
    """The base disks, each chain confined to the root, and their infos."""
    disks = disks_of(record)
    if not disks:
        raise IllegalValue(f"VM {record['name']!r} has no disks to snapshot")
    if tree is not None and tree.bases != disks:
        raise IllegalValue(f"The disks of VM {record['name']!r} differ from those its "
                           "snapshots were taken of")
    files = HostFiles.of(run.settings)
    bases = [files.resolve(disk, must_exist=True) for disk in disks]
    with ExitStack() as stack:
        infos = [files.open_chain(base, stack).links[0].info for base in bases]
    return bases, infos


def refuse_undoable(record: dict[str, str]) -> None:
    if record.get("undoable") == "1":
        raise InvalidStateError(
            f"VM {record['name']!r} is undoable: snapshots of a VM with undo disks are not "
            "supported (merge or discard its undo disks and recreate it without them)")


def snapshot_output(folder: Path, tree: engine.Tree, name: str) -> dict[str, Any]:
    view = engine.public_view(folder, tree)
    fields = next(s for s in view["snapshots"] if s["name"] == name)
    return {**fields, "is_current": name in tree.ancestors(tree.present_parent),
            "paused_ms": 0}


def seal(run: TaskRun) -> None:
    """Past here the task finishes whatever a cancel says: unless a cancel came first
    (then `Cancelled`, with nothing changed yet), its record stops being cancelable,
    so `is_cancelable` reads False and `cancel()` is refused from that moment."""
    if not Scripts.of(run.redis).task_seal(record=keys.task_record(run.task_id)):
        raise Cancelled()


def saved_files(state_file: Path) -> tuple[Path, Path]:
    """A saved state and its fingerprint file."""
    return state_file, fingerprint_path(state_file)


def refingerprint(settings: Settings, record: dict[str, str]) -> None:
    """A saved state is bound to its configuration, whose disk paths change with the
    present: the fingerprint file is rewritten for what the VM runs on now."""
    paths = paths_of(settings, record["name"])
    metadata = json.loads(paths.fingerprint_file.read_text())
    config = config_of(settings, record)
    metadata["fingerprint"] = config_fingerprint(config)
    metadata["config"] = config.to_dict()
    temp = paths.fingerprint_file.with_name(paths.fingerprint_file.name + ".tmp")
    temp.write_text(json.dumps(metadata, indent=2))
    os.replace(temp, paths.fingerprint_file)
    fsync_directory(paths.directory)


@operation(tasks.VM_CREATE_SNAPSHOT)
def create_snapshot(run: TaskRun, name: str, snapshot: str,
                    include_memory: bool = True) -> dict[str, Any]:
    """Freeze the present as the new point's layer and start a new present over it.
    A Saved VM's state file (with include_memory) belongs to the point too, linked
    beside its layer; a TurnedOff VM has no memory: include_memory then reads False."""
    check_snapshot_name(snapshot)
    with vm_lock(run, name):
        client, record, state = begin(run, name, None)
        refuse_undoable(record)
        folder = vm_directory(run.settings, name)
        tree = engine.load(folder)
        if tree is not None and tree.find(snapshot) is not None:
            raise IllegalValue(f"VM {name!r} already has a snapshot named {snapshot!r}")
        bases, infos = checked_bases(run, record, tree)
        if state in snapshots_live.LIVE:
            return snapshots_live.create(run, client, record, name, snapshot, include_memory,
                                         state, folder, tree, bases, infos)
        count = len(bases)
        present = engine.new_layer_id()
        made: list[Path] = []
        try:
            if tree is None:
                layer = engine.new_layer_id()
                engine.create_overlays(bases, engine.layer_files(folder, layer, count), infos,
                                       run)
                made += engine.layer_files(folder, layer, count)
                tree = engine.Tree(bases=disks_of(record), present=None, present_parent=None)
            else:
                assert tree.present is not None
                layer = tree.present
            run.report_progress(40)
            engine.create_overlays(engine.layer_files(folder, layer, count),
                                   engine.layer_files(folder, present, count), infos, run)
            made += engine.layer_files(folder, present, count)
            run.report_progress(80)
            keep_memory = include_memory is True and state is S.Saved
            if keep_memory:
                paths = paths_of(run.settings, name)
                for source, target in zip(saved_files(paths.state_file),
                                          saved_files(engine.state_file(folder, layer)),
                                          strict=True):
                    os.link(source, target)
                    made.append(target)
            raise_if_cancelled(run)
            tree.snapshots.append(engine.Point(
                name=snapshot, parent=tree.present_parent, created=time.time(),
                include_memory=keep_memory, state=int(state), layer=layer))
            tree.present, tree.present_parent = present, snapshot
            engine.store(folder, tree)  # from here on the point exists
        except BaseException:
            for path in made:
                remove_quietly(path)
            raise
        for path in engine.layer_files(folder, layer, count):
            engine.freeze(path)
        if state is S.Saved:  # its state now belongs to the new present's path
            refingerprint(run.settings, record)
        publish(client, name, folder, tree)
        return snapshot_output(folder, tree, snapshot)


@operation(tasks.VM_REVERT_TO_SNAPSHOT)
def revert_to_snapshot(run: TaskRun, name: str, snapshot: str) -> dict[str, Any]:
    """A new empty present over the point's layer; the old present goes."""
    check_snapshot_name(snapshot)
    with vm_lock(run, name):
        client, record, state = begin(run, name, None)
        folder = vm_directory(run.settings, name)
        tree = engine.load(folder)
        if tree is None or tree.find(snapshot) is None:
            raise IllegalValue(f"VM {name!r} has no snapshot named {snapshot!r}")
        bases, infos = checked_bases(run, record, tree)
        live = state in snapshots_live.LIVE
        if live:  # QEMU stops first; then the revert is the cold one
            snapshots_live.stop_for_revert(run, client, name)
            state = S.TurnedOff
        count = len(bases)
        point = tree.require(snapshot)
        present = engine.new_layer_id()
        new_files = engine.layer_files(folder, present, count)
        old = tree.present
        paths = paths_of(run.settings, name)
        # The point's saved state, linked in beside the VM's under temporary names.
        temps = [temporary_path_for(path, run.task_id) for path in saved_files(paths.state_file)]
        try:
            engine.create_overlays(engine.layer_files(folder, point.layer, count), new_files,
                                   infos, run)
            if point.include_memory:
                for source, temp in zip(saved_files(engine.state_file(folder, point.layer)),
                                        temps, strict=True):
                    os.link(source, temp)
            run.report_progress(80)
            raise_if_cancelled(run)
            tree.present, tree.present_parent = present, snapshot
            engine.store(folder, tree)
        except BaseException:
            for path in [*new_files, *temps]:
                remove_quietly(path)
            raise
        if old is not None:
            for path in engine.layer_files(folder, old, count):
                remove_quietly(path)
        qemu_vm.discard_saved_state(paths)  # the present it belonged to is gone
        if point.include_memory:
            for temp, path in zip(temps, saved_files(paths.state_file), strict=True):
                os.replace(temp, path)
            refingerprint(run.settings, record)
            transition(client, name, frozenset({state}), S.Saved)
        elif state is not S.TurnedOff:
            settle(client, name, S.TurnedOff)
        publish(client, name, folder, tree)
        if live and point.include_memory:  # the same boot goes on where it stood
            snapshots_live.restore(run, client, name)
        return snapshot_output(folder, tree, snapshot)


@operation(tasks.VM_DELETE_SNAPSHOT)
def delete_snapshot(run: TaskRun, name: str, snapshot: str) -> dict[str, Any]:
    """Rebase what rests directly on the point's layer onto the layer below, then drop
    the point and its layer; the last one also commits the present into the bases."""
    check_snapshot_name(snapshot)
    with vm_lock(run, name):
        client, record, state = begin(run, name, None)
        if state in snapshots_live.LIVE:  # the VM runs on while its layers change
            return _delete(run, client, record, name, snapshot, live=True)
        transition(client, name, frozenset({state}), S.MergingDrives)
        try:
            return _delete(run, client, record, name, snapshot)
        finally:
            settle(client, name, state)


def _delete(run: TaskRun, client: redis.Redis, record: dict[str, str], name: str,
            snapshot: str, live: bool = False) -> dict[str, Any]:
    folder = vm_directory(run.settings, name)
    tree = engine.load(folder)
    if tree is None or tree.find(snapshot) is None:
        raise IllegalValue(f"VM {name!r} has no snapshot named {snapshot!r}")
    below = tree.descendants(snapshot)
    resting = {clone: point for clone, point in linked_clones(client, name).items()
               if point in below}
    if resting:
        raise InvalidStateError(
            f"Snapshot {snapshot!r} of VM {name!r} cannot be deleted: linked clones rest "
            f"on it ({', '.join(sorted(resting))})")
    bases, _infos = checked_bases(run, record, tree)
    count = len(bases)
    if live:
        return snapshots_live.delete(run, client, record, name, snapshot, folder, tree, bases)
    point = tree.require(snapshot)
    layers = engine.layer_files(folder, point.layer, count)
    others = [p.layer for p in tree.snapshots if p.name != snapshot]
    if tree.present is not None:
        others.append(tree.present)
    for index, layer in enumerate(layers):
        below_layer = engine.parent_of(layer)
        if below_layer is None:
            raise IllegalValue(f"The layer {layer.name} of snapshot {snapshot!r} has no parent")
        images = [engine.layer_file(folder, other, index) for other in others]
        children = engine.children_of(layer, images)
        for number, child in enumerate(children):
            low = 90 * (index + number / max(1, len(children))) / count
            high = 90 * (index + (number + 1) / max(1, len(children))) / count
            engine.rebase(child, below_layer, run, (low, high))
    seal(run)
    # The point of no return: the tree no longer names the point.
    tree.snapshots = [p for p in tree.snapshots if p.name != snapshot]
    for other in tree.snapshots:
        if other.parent == snapshot:
            other.parent = point.parent
    if tree.present_parent == snapshot:
        tree.present_parent = point.parent
    engine.store(folder, tree)
    for layer in [*layers, *saved_files(engine.state_file(folder, point.layer))]:
        remove_quietly(layer)
    if tree.snapshots:
        publish(client, name, folder, tree)
        return {"deleted": snapshot, "snapshots": len(tree.snapshots)}
    # No point left: fold the present into the bases, the VM is plain again.  In
    # place, so not cancelable; the tree keeps naming the present until it is done,
    # so a crash half-way leaves the VM running on a present that reads the same.
    files = HostFiles.of(run.settings)
    assert tree.present is not None
    presents = engine.layer_files(folder, tree.present, count)
    for index, present in enumerate(presents):
        with ExitStack() as stack:
            chain = files.open_chain(present, stack)
            qemu_img.merge(present, scaled(run, 90 + 10 * index / count,
                                           90 + 10 * (index + 1) / count),
                           chain=chain.pinned())
    engine.store(folder, None)
    for present in presents:
        remove_quietly(present)
    if paths_of(run.settings, name).state_file.exists():  # Saved: its disks are the bases now
        refingerprint(run.settings, record)
    publish(client, name, folder, None)
    return {"deleted": snapshot, "snapshots": 0}


# -- the host's start ---------------------------------------------------------------


def recover(client: redis.Redis, settings: Settings) -> None:
    """At a worker's start (nothing runs yet): remove layer files no tree names (left
    by a crashed create, revert or delete), and write each tree into its record again
    (the file is the authority; Redis may have lost the last write)."""
    for record in host_vms(client, settings):
        name = record["name"]
        fd = try_lock(settings, name)
        if fd is None:
            continue
        try:
            folder = vm_directory(settings, name)
            tree = engine.load(folder)
            for leftover in engine.orphans(folder, tree):
                log.warning("Removing %s: a snapshot layer no tree of %s names", leftover, name)
                remove_quietly(leftover)
            if tree is not None or record.get(TREE_FIELD):
                publish(client, name, folder, tree)
        except Exception as exc:  # noqa: BLE001  one VM cannot stop the worker's start
            log.error("Could not recover the snapshots of VM %s: %s", name, exc)
        finally:
            os.close(fd)
