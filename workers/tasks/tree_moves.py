"""A VM's snapshot tree on a move: what goes with it, what is refused.

A cold move carries the whole tree: every layer file (each snapshot's and the
present's), the saved states of points with memory and ``tree.json``, all under
``vms/<name>/snapshots/`` and pulled byte for byte to the same relative paths in
the destination's root.  Every layer names its backing file relative to its own
folder (`workers.engines.qemu_img.create_differencing`), and the bases arrive at
their own relative paths too, so each chain reads the same bytes there with no
rewrite; the destination still opens every chain confined to its root before the
record names it (a layer whose backing escaped the root is refused, and nothing
moves).  The tree file comes last in the list, so a move cut short never leaves a
tree naming layers that did not arrive (the move's journal removes them anyway).

A live move carries it too: the chain below each disk's present (the layers of the
snapshots it descends from, and the base) goes byte for byte first as for any
chain (`workers.tasks.live_chain`), and with it every other file of the tree
(`live_extras`: the other branches' layers, the saved states, the tree file); only
the present, the one image QEMU writes, is mirrored.  Refused before anything
moves: a linked clone (it rests on its source's layers) and a VM that linked clones
rest on (they would lose their backing).
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from api.errors import InvalidStateError
from api.protocol.snapshots import CLONE_FIELD, linked_clones
from workers.engines import snapshots as engine
from workers.engines.files import HostFiles
from workers.engines.qemu_vm.config import fingerprint_path
from workers.runtime import TaskRun
from workers.tasks.vms import paths_of


def refuse_clone_links(run: TaskRun, record: dict[str, str]) -> None:
    """A linked clone, or a VM that linked clones rest on, stays on its host."""
    name = record["name"]
    if record.get(CLONE_FIELD):
        raise InvalidStateError(f"VM {name!r} is a linked clone, which stays on its "
                                "source's host")
    resting = run.ride_out(lambda: linked_clones(run.redis, name), "reading linked clones")
    if resting:
        raise InvalidStateError(f"VM {name!r} cannot move: linked clones rest on its "
                                f"snapshots ({', '.join(sorted(resting))})")


def live_extras(run: TaskRun, name: str, below: list[dict[str, Any]]
                ) -> list[dict[str, Any]]:
    """The files of the tree that a live move's chains do not carry (``below``'s
    entries: each a path relative to the root, its format and sizes), the tree file
    last; none without a tree.  The present's layers are the tops QEMU mirrors."""
    folder = paths_of(run.settings, name).directory
    tree = engine.load(folder)
    if tree is None:
        return []
    files = HostFiles.of(run.settings)
    present = set(engine.layer_files(folder, tree.present, len(tree.bases))
                  if tree.present else [])
    carried = {item["path"] for item in below}
    extras: list[dict[str, Any]] = []
    for path in tree_files(run, name):
        relative = files.relative(path)
        if path in present or relative in carried:
            continue
        size = os.stat(path)
        extras.append({"path": relative, "format": "qcow2" if path.suffix == ".qcow2"
                       else "raw", "size": size.st_size, "allocated": size.st_blocks * 512})
    return extras


def tree_files(run: TaskRun, name: str) -> list[Path]:
    """Every file of the VM's tree, the tree file last; none without a tree."""
    folder = paths_of(run.settings, name).directory
    tree = engine.load(folder)
    if tree is None:
        return []
    count = len(tree.bases)
    found: list[Path] = []
    for point in tree.snapshots:
        found += engine.layer_files(folder, point.layer, count)
        if point.include_memory:
            state = engine.state_file(folder, point.layer)
            found += [state, fingerprint_path(state)]
    if tree.present is not None:
        found += engine.layer_files(folder, tree.present, count)
    return [*found, engine.directory(folder) / engine.TREE_FILE]


def arrived(run: TaskRun, name: str) -> int:
    """On the destination, once every file is here and before the record names it:
    each chain opens confined to this root (`IllegalValue` otherwise), and the
    snapshots' layers are read-only again.  Returns the number of snapshots."""
    folder = paths_of(run.settings, name).directory
    tree = engine.load(folder)
    if tree is None:
        return 0
    files = HostFiles.of(run.settings)
    count = len(tree.bases)
    layers = [p.layer for p in tree.snapshots] + ([tree.present] if tree.present else [])
    with ExitStack() as stack:
        for layer in layers:
            for path in engine.layer_files(folder, layer, count):
                files.open_chain(path, stack)
    for point in tree.snapshots:
        for path in engine.layer_files(folder, point.layer, count):
            engine.freeze(path)
    return len(tree.snapshots)
