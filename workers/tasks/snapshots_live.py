"""Snapshots of a Running or Paused VM: create, revert and delete while QEMU runs.

The tree and its files are `workers.engines.snapshots`'s, as for a TurnedOff VM;
what differs is that QEMU writes the present and has every layer below it open, so
the layers change under QEMU's own block layer (`workers.engines.qemu_vm.livesnap`):

- create: new overlays switched in by one QMP transaction (with RAM migrated into
  the point's state file first, CPUs stopped, when ``include_memory``);
- revert: QEMU stops, the revert is the cold one, and a point with memory restores
  its RAM (the same boot goes on);
- delete: what rests on the point's layer in QEMU's chain is streamed over it
  (``block-stream``), other branches are rebased as cold; the last point's present
  is committed into the bases (active ``block-commit`` and ``job-complete``).

A create journals itself in ``pending.json`` beside the tree before QEMU sees a
file of it, and `recover_pending` (a worker's start, before the VM states are
reconciled) asks the still running QEMU whether the switch happened: then the point
is completed, else its files go; a guest the crash left stopped runs again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import redis

from api.enums import VMVMState as S
from api.settings import Settings
from workers.engines import qemu_vm
from workers.engines import snapshots as engine
from workers.engines.context import scaled
from workers.engines.files import HostFiles
from workers.engines.qemu_vm import livesnap
from workers.engines.qemu_vm.config import fingerprint_path
from workers.engines.storage import fsync_directory, remove_quietly, temporary_path_for
from workers.failures import IllegalValue, OperationFailed
from workers.runtime import TaskRun
from workers.tasks.vms import (
    agent_socket,
    config_of,
    host_vms,
    open_vm_files,
    paths_of,
    record_runtime,
    settle,
    transition,
    try_lock,
)

log = logging.getLogger(__name__)

PENDING_FILE = "pending.json"
LIVE = frozenset({S.Running, S.Paused})
JOB_TIMEOUT = 3600.0


def _pending_path(folder: Path) -> Path:
    return engine.directory(folder) / PENDING_FILE


def _write_pending(folder: Path, data: dict[str, Any]) -> None:
    path = _pending_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{PENDING_FILE}.tmp")
    with open(temp, "w") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    fsync_directory(path.parent, strict=True)


def _drop_pending(folder: Path) -> None:
    remove_quietly(_pending_path(folder))
    fsync_directory(engine.directory(folder))


# -- create --------------------------------------------------------------------------


def create(run: TaskRun, client: redis.Redis, record: dict[str, str], name: str,
           snapshot: str, include_memory: bool, state: S, folder: Path,
           tree: engine.Tree | None, bases: list[Path], infos: list[Any]) -> dict[str, Any]:
    from workers.tasks.snapshots import publish, seal, snapshot_output

    count = len(bases)
    paths = paths_of(run.settings, name)
    config = config_of(run.settings, record)
    present = engine.new_layer_id()
    first = tree is None
    layer = engine.new_layer_id() if tree is None else tree.present
    assert layer is not None
    made: list[Path] = []
    stacks: list[list[tuple[Path, str]]] = [[] for _ in range(count)]
    state_files = (engine.state_file(folder, layer),
                   fingerprint_path(engine.state_file(folder, layer)))
    try:
        if first:
            engine.create_overlays(bases, engine.layer_files(folder, layer, count), infos, run)
            made += engine.layer_files(folder, layer, count)
            for index, path in enumerate(engine.layer_files(folder, layer, count)):
                stacks[index].append((path, livesnap.node_name(layer, index)))
        engine.create_overlays(engine.layer_files(folder, layer, count),
                               engine.layer_files(folder, present, count), infos, run)
        made += engine.layer_files(folder, present, count)
        for index, path in enumerate(engine.layer_files(folder, present, count)):
            stacks[index].append((path, livesnap.node_name(present, index)))
        _write_pending(folder, {
            "snapshot": snapshot, "layer": layer, "present": present, "first": first,
            "bases": json.loads(record["disks"]), "memory": include_memory,
            "state": int(state), "created": time.time(), "resume": state is S.Running})
        run.report_progress(10)
        memory = None
        if include_memory:
            memory = (temporary_path_for(state_files[0], run.task_id), state_files[0])
            made += list(state_files)
        with qemu_vm.connect(paths) as monitor:
            livesnap.settle_jobs(monitor, run)  # a dead worker's would block the switch
            captured = livesnap.capture(
                monitor, config, stacks, scaled(run, 10, 90), state=memory,
                agent=agent_socket(paths) if record.get("guest_agent") == "1" else None,
                before_switch=lambda: seal(run))
        # The switch happened: from here the point exists whatever comes.
        if tree is None:
            tree = engine.Tree(bases=json.loads(record["disks"]), present=None,
                               present_parent=None)
        tree.snapshots.append(engine.Point(
            name=snapshot, parent=tree.present_parent, created=time.time(),
            include_memory=include_memory, state=int(state), layer=layer))
        tree.present, tree.present_parent = present, snapshot
        engine.store(folder, tree)
    except BaseException:
        for path in made:
            remove_quietly(path)
        _drop_pending(folder)
        raise
    _drop_pending(folder)
    for path in engine.layer_files(folder, layer, count):
        engine.freeze(path)
    publish(client, name, folder, tree)
    return {**snapshot_output(folder, tree, snapshot), "paused_ms": captured.paused_ms,
            "frozen_ms": captured.frozen_ms, "frozen": captured.frozen}


# -- revert --------------------------------------------------------------------------


def stop_for_revert(run: TaskRun, client: redis.Redis, name: str) -> None:
    """QEMU goes (a revert discards its present anyway); not cancelable from here."""
    from workers.tasks.snapshots import seal

    seal(run)
    paths = paths_of(run.settings, name)
    transition(client, name, LIVE, S.TurningOff)
    try:
        qemu_vm.turn_off(paths)
    finally:
        settle(client, name, qemu_vm.vm_state(paths))


def restore(run: TaskRun, client: redis.Redis, name: str) -> None:
    """A Saved VM (a reverted point with memory) runs again from its state."""
    from workers.tasks.vms import record_of

    paths = paths_of(run.settings, name)
    record = record_of(client, run.settings, name)
    transition(client, name, frozenset({S.Saved}), S.Restoring)
    with ExitStack() as opened_files:
        try:
            opened = open_vm_files(run, record, paths, opened_files)
            pid = qemu_vm.start(config_of(run.settings, record), paths, run,
                                incoming_state=paths.state_file, opened=opened)
        except BaseException:
            settle(client, name, qemu_vm.vm_state(paths))
            raise
    try:
        record_runtime(client, name, paths, pid)
    finally:
        settle(client, name, qemu_vm.vm_state(paths))


# -- delete --------------------------------------------------------------------------


def delete(run: TaskRun, client: redis.Redis, record: dict[str, str], name: str,
           snapshot: str, folder: Path, tree: engine.Tree, bases: list[Path]
           ) -> dict[str, Any]:
    """Every image resting on the point's layer reads the same without it: those in
    QEMU's chain by a stream, the others by a rebase; then the point goes, and with
    the last one the present is committed into the bases."""
    from workers.tasks.snapshots import publish, saved_files, seal

    paths = paths_of(run.settings, name)
    pid = qemu_vm.find_pid(paths)
    if pid is None:
        raise OperationFailed(f"VM {name!r} is not running")
    count = len(bases)
    point = tree.require(snapshot)
    layers = engine.layer_files(folder, point.layer, count)
    others = [p.layer for p in tree.snapshots if p.name != snapshot]
    assert tree.present is not None
    others.append(tree.present)
    with qemu_vm.connect(paths) as monitor:
        livesnap.settle_jobs(monitor, run)  # a dead worker's
        nodes = livesnap.nodes_by_file(monitor, pid)
        for index, layer in enumerate(layers):
            # QEMU's chain says what rests on what in it; only the images of other
            # branches need their headers read.
            chain = livesnap.chain_files(monitor, pid, index)
            real = os.path.realpath(layer)
            if real in chain and chain.index(real) + 1 < len(chain):
                below: Path | None = Path(chain[chain.index(real) + 1])
            else:
                below = engine.parent_of(layer)
            if below is None:
                raise IllegalValue(f"The layer {layer.name} of snapshot {snapshot!r} has "
                                   "no parent")
            images = [engine.layer_file(folder, other, index) for other in others]
            children = engine.children_of(
                layer, [i for i in images if os.path.realpath(i) not in chain])
            if real in chain and chain.index(real) > 0:
                children.append(Path(chain[chain.index(real) - 1]))
            for number, child in enumerate(children):
                low = 80 * (index + number / len(children)) / count
                high = 80 * (index + (number + 1) / len(children)) / count
                node = nodes.get(os.path.realpath(child))
                if node is None:  # another branch: QEMU does not have it open
                    engine.rebase(child, below, run, (low, high))
                    continue
                _stream(run, monitor, node, nodes, child, below, index, (low, high))
        seal(run)
        tree.snapshots = [p for p in tree.snapshots if p.name != snapshot]
        for other in tree.snapshots:
            if other.parent == snapshot:
                other.parent = point.parent
        if tree.present_parent == snapshot:
            tree.present_parent = point.parent
        livesnap.release_unused(monitor)
        if tree.snapshots:
            engine.store(folder, tree)
            for path in [*layers, *saved_files(engine.state_file(folder, point.layer))]:
                remove_quietly(path)
            publish(client, name, folder, tree)
            return {"deleted": snapshot, "snapshots": len(tree.snapshots)}
        # The last point: the present goes into the bases, QEMU pivoting onto them.
        # The point is gone first (the commit changes what it read): a worker killed
        # here leaves a tree of no point over the present, which the next start
        # folds away once QEMU has pivoted (`recover_pending`).
        engine.store(folder, tree)
        for path in [*layers, *saved_files(engine.state_file(folder, point.layer))]:
            remove_quietly(path)
        publish(client, name, folder, tree)
        presents = engine.layer_files(folder, tree.present, count)
        nodes = livesnap.nodes_by_file(monitor, pid)
        for index, present in enumerate(presents):
            chain = livesnap.chain_files(monitor, pid, index)
            if chain[0] == os.path.realpath(bases[index]):
                continue  # pivoted already (by a dead worker's job)
            base = nodes.get(chain[1]) if len(chain) > 1 else None
            top = nodes.get(os.path.realpath(present))
            if base is None or top is None:
                raise OperationFailed(f"QEMU does not have {present.name} over its base open")
            job = f"vmtask-commit-{index}"
            run.log(f"QMP block-commit {job}: {present.name} into the base (active)")
            monitor.execute("block-commit", {"job-id": job, "device": livesnap.device_of(index),
                                             "top-node": top, "base-node": base,
                                             "auto-dismiss": False})
            livesnap.run_job(monitor, job, run, lambda: None, JOB_TIMEOUT,
                             qemu_vm_span(run, 80 + 20 * index / count,
                                          80 + 20 * (index + 1) / count))
        livesnap.release_unused(monitor)
    engine.store(folder, None)
    for present in presents:
        remove_quietly(present)
    publish(client, name, folder, None)
    return {"deleted": snapshot, "snapshots": 0}


def qemu_vm_span(run: TaskRun, low: float, high: float) -> Any:
    from workers.engines.context import ProgressSpan

    return ProgressSpan(run, low, high, min_step=0.5)


def _stream(run: TaskRun, monitor: qemu_vm.Monitor, node: str, nodes: dict[str, str],
            child: Path, below: Path, index: int, span: tuple[float, float]) -> None:
    """``child`` (in QEMU's chain) takes in what the layer between it and ``below``
    held, and then rests on ``below`` (its header naming it relatively, as ours do)."""
    base = nodes.get(str(below))
    if base is None:
        raise OperationFailed(f"QEMU does not have {below} open under {child.name}")
    job = f"vmtask-stream-{index}"
    writable = bool(os.stat(child).st_mode & 0o200)
    if not writable:
        engine.thaw(child)
    try:
        run.log(f"QMP block-stream {job}: into {child.name} down to {below.name}")
        monitor.execute("block-stream", {
            "job-id": job, "device": node, "base-node": base, "auto-dismiss": False,
            "backing-file": os.path.relpath(below, child.parent)})
        livesnap.run_job(monitor, job, run, lambda: None, JOB_TIMEOUT,
                         qemu_vm_span(run, *span))
    finally:
        if not writable:
            engine.freeze(child)


# -- a worker's start ----------------------------------------------------------------


def recover_pending(client: redis.Redis, settings: Settings) -> None:
    """A create that a dead worker left between its journal and its tree: complete it
    when QEMU switched (its disks run on the new overlays), else remove its files;
    and let a guest it left stopped run on."""
    for record in host_vms(client, settings):
        name = record["name"]
        folder = paths_of(settings, name).directory
        pending = _pending_path(folder).exists()
        if not pending and not (engine.directory(folder) / engine.TREE_FILE).exists():
            continue
        fd = try_lock(settings, name)
        if fd is None:
            continue
        try:
            if pending:
                _recover_one(settings, name, folder)
            _fold(client, settings, name, folder)
        except Exception as exc:  # noqa: BLE001  one VM cannot stop the worker's start
            log.error("Could not recover the unfinished snapshot of VM %s: %s", name, exc)
        finally:
            os.close(fd)


def _fold(client: redis.Redis, settings: Settings, name: str, folder: Path) -> None:
    """A tree left with no point (a live delete of the last one, killed in its commit):
    a dead worker's job is settled, and once QEMU runs on the bases the tree and the
    present go.  Else the VM runs on in its present, which reads the same."""
    from workers.tasks.snapshots import publish

    tree = engine.load(folder)
    paths = paths_of(settings, name)
    if tree is None or tree.snapshots or tree.present is None or not qemu_vm.is_alive(paths):
        return
    pid = qemu_vm.find_pid(paths)
    if pid is None:
        return
    files = HostFiles.of(settings)
    bases = [os.path.realpath(files.resolve(disk, must_exist=True)) for disk in tree.bases]
    with qemu_vm.connect(paths) as monitor:
        livesnap.settle_jobs(monitor, _Logged(name))
        tops = [livesnap.chain_files(monitor, pid, i)[0] for i in range(len(bases))]
        livesnap.release_unused(monitor)
    if tops != bases:
        return
    engine.store(folder, None)
    for present in engine.layer_files(folder, tree.present, len(bases)):
        remove_quietly(present)
    publish(client, name, folder, None)
    log.warning("Folded the snapshot tree of VM %s away: a dead worker's last delete "
                "had pivoted", name)


class _Logged:
    """A worker start's context: no task, lines to the log."""

    task_id = "recover"

    def __init__(self, name: str) -> None:
        self._name = name

    def report_progress(self, percent: float) -> None:
        pass

    def cancel_requested(self) -> bool:
        return False

    def log(self, line: str) -> None:
        log.warning("VM %s: %s", self._name, line)


def _recover_one(settings: Settings, name: str, folder: Path) -> None:
    pending = json.loads(_pending_path(folder).read_text())
    paths = paths_of(settings, name)
    count = len(pending["bases"])
    layer, present = pending["layer"], pending["present"]
    switched = False
    if qemu_vm.is_alive(paths):
        with qemu_vm.connect(paths) as monitor:
            tops = livesnap.disk_tops(monitor, count)
            switched = tops == [livesnap.node_name(present, i) for i in range(count)]
            if not switched:
                livesnap.drop_nodes(monitor, [livesnap.node_name(n, i) for n in (present, layer)
                                              for i in range(count)])
            if pending["resume"] and monitor.execute("query-status")["status"] != "running":
                with contextlib.suppress(OperationFailed):
                    monitor.execute("migrate_cancel")
                monitor.execute("cont")
    state = engine.state_file(folder, layer)
    if switched and (not pending["memory"] or fingerprint_path(state).exists()):
        tree = engine.load(folder) or engine.Tree(bases=pending["bases"], present=None,
                                                  present_parent=None)
        tree.snapshots.append(engine.Point(
            name=pending["snapshot"], parent=tree.present_parent, created=pending["created"],
            include_memory=pending["memory"], state=pending["state"], layer=layer))
        tree.present, tree.present_parent = present, pending["snapshot"]
        engine.store(folder, tree)
        for path in engine.layer_files(folder, layer, count):
            engine.freeze(path)
        log.warning("Completed snapshot %s of VM %s, which a dead worker had taken",
                    pending["snapshot"], name)
    elif switched:
        # The disks switched but the RAM never became a state: the guest stays on the
        # new present, whose layer becomes a disk-only point of the same name.
        pending["memory"] = False
        _write_pending(folder, pending)
        _recover_one(settings, name, folder)
        return
    else:
        files = engine.layer_files(folder, present, count)
        if pending["first"]:
            files += engine.layer_files(folder, layer, count)
        for path in [*files, state, fingerprint_path(state)]:
            remove_quietly(path)
        log.warning("Removed the unfinished snapshot %s of VM %s", pending["snapshot"], name)
    _drop_pending(folder)
