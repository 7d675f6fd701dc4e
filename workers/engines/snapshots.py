"""A VM's snapshot tree on disk: external qcow2 layers and the tree file beside them.

Layout, under ``vms/<name>/snapshots/``::

    tree.json                 the tree (below); the worker's authority
    <layer>-<disk index>.qcow2

Each disk of a VM with snapshots is a chain: its base disk (the file the VM record
names, frozen read-only while snapshots exist) under layers of qcow2 overlays.
Every snapshot owns one *layer* (one overlay per disk) and never changes what it
reads; the VM's *present* is one more overlay set, the only one QEMU writes.

- The first snapshot puts an empty layer over each base (the snapshot's) and the
  present over it, so that every snapshot's layer is a file of ours and the base
  itself is never a layer to remove.
- A later snapshot freezes the present as its layer and starts a new present over it.
- Revert starts a new empty present over the snapshot's layer and drops the old one.
- Delete rebases every image directly over the snapshot's layer onto the layer below
  (``qemu-img rebase``, safe mode: only the clusters that layer holds are read and
  copied), then removes the layer.  The children are found from the images' own
  headers, so a rebase interrupted half-way (cancel or crash) leaves a tree whose
  images all still read the same bytes, and deleting again finishes it.  When the
  last snapshot goes, the present is committed into the base and removed: the VM
  is a plain VM again.

The tree file is written atomically (temporary, fsync, rename, fsync of the
directory) under the VM's lock and always *after* the files it names exist, and
*before* the files it no longer names are removed; files of ours that it does not
name are leftovers of a crashed operation (`orphans`).  No Celery, no Redis.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from workers.engines.context import OperationContext, scaled
from workers.engines.qemu_img import DiskInfo, create_differencing, format_for, info
from workers.engines.qemu_img.runner import run_qemu_img
from workers.engines.storage import fsync_directory, remove_quietly
from workers.failures import IllegalValue

DIRECTORY = "snapshots"
TREE_FILE = "tree.json"
VERSION = 1


@dataclass
class Point:
    """One snapshot as the worker keeps it."""

    name: str
    parent: str | None
    created: float
    include_memory: bool
    state: int
    layer: str


@dataclass
class Tree:
    bases: list[str]
    """The VM's disks (relative to the root) when the tree began: the chains' bottoms."""
    present: str | None
    """The layer id of the overlays the VM runs on; None once nothing is left."""
    present_parent: str | None
    """The snapshot the present descends from (the last taken or reverted to)."""
    snapshots: list[Point] = field(default_factory=list)

    def find(self, name: str) -> Point | None:
        return next((p for p in self.snapshots if p.name == name), None)

    def require(self, name: str) -> Point:
        point = self.find(name)
        if point is None:
            raise IllegalValue(f"No snapshot named {name!r}")
        return point

    def ancestors(self, name: str | None) -> list[str]:
        """``name`` and every snapshot above it, nearest first."""
        chain: list[str] = []
        while name is not None:
            chain.append(name)
            name = self.require(name).parent
        return chain

    def descendants(self, name: str) -> list[str]:
        """``name`` and every snapshot below it."""
        found = [name]
        for point in self.snapshots:  # creation order: a parent comes before its children
            if point.parent in found:
                found.append(point.name)
        return found

    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, "bases": self.bases, "present": self.present,
                "present_parent": self.present_parent,
                "snapshots": [asdict(p) for p in self.snapshots]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Tree:
        if data.get("version") != VERSION:
            raise IllegalValue(f"Unknown snapshot tree version {data.get('version')!r}")
        return cls(bases=list(data["bases"]), present=data.get("present"),
                   present_parent=data.get("present_parent"),
                   snapshots=[Point(**p) for p in data["snapshots"]])


def directory(vm_directory: Path) -> Path:
    return vm_directory / DIRECTORY


def layer_file(vm_directory: Path, layer: str, index: int) -> Path:
    return directory(vm_directory) / f"{layer}-{index}.qcow2"


def layer_files(vm_directory: Path, layer: str, count: int) -> list[Path]:
    return [layer_file(vm_directory, layer, i) for i in range(count)]


def state_file(vm_directory: Path, layer: str) -> Path:
    """The saved state a point with memory keeps beside its layer (fingerprint: + .json)."""
    return directory(vm_directory) / f"{layer}.state"


def new_layer_id() -> str:
    return secrets.token_hex(6)


def load(vm_directory: Path) -> Tree | None:
    path = directory(vm_directory) / TREE_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return Tree.from_json(json.loads(text))
    except (ValueError, KeyError, TypeError) as exc:
        raise IllegalValue(f"The snapshot tree {path} is unreadable: {exc}") from None


def store(vm_directory: Path, tree: Tree | None) -> None:
    """Replace the tree file atomically and durably; None removes it."""
    folder = directory(vm_directory)
    path = folder / TREE_FILE
    if tree is None:
        remove_quietly(path)
        fsync_directory(folder)
        return
    folder.mkdir(parents=True, exist_ok=True)
    temp = folder / f".{TREE_FILE}.tmp"
    with open(temp, "w") as handle:
        json.dump(tree.to_json(), handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    fsync_directory(folder, strict=True)


def present_disks(vm_directory: Path, tree: Tree | None, bases: list[Path]) -> list[Path]:
    """What QEMU runs on: the present overlays, or the bases when there is no tree."""
    if tree is None or tree.present is None:
        return bases
    return layer_files(vm_directory, tree.present, len(bases))


def present_disk(vm_directory: Path, index: int, disk: str) -> Path | None:
    """The present overlay of disk ``index`` (``disk`` in the VM's record) of a VM with
    snapshots, else None; `IllegalValue` when the record's disks are not those the
    tree rests on (the VM must not run on another chain than its present's)."""
    tree = load(vm_directory)
    if tree is None or tree.present is None:
        return None
    if index >= len(tree.bases) or tree.bases[index] != disk:
        raise IllegalValue(f"The disk {disk} differs from the snapshots' base disks "
                           f"{tree.bases}: the VM's disks changed under its snapshots")
    return layer_file(vm_directory, tree.present, index)


def snapshot_disks(vm_directory: Path, tree: Tree, name: str, count: int) -> list[Path]:
    """The top of each disk's chain as snapshot ``name`` reads it."""
    return layer_files(vm_directory, tree.require(name).layer, count)


def size_on_host(files: Iterable[Path]) -> int:
    total = 0
    for path in files:
        try:
            total += os.stat(path).st_blocks * 512
        except FileNotFoundError:
            pass
    return total


def public_view(vm_directory: Path, tree: Tree | None) -> dict[str, Any]:
    """What the VM record carries for producers (`api.snapshots.Snapshot`)."""
    if tree is None:
        return {"present_parent": None, "snapshots": []}
    count = len(tree.bases)
    return {
        "present_parent": tree.present_parent,
        "snapshots": [
            {"name": p.name, "parent": p.parent, "created": p.created,
             "include_memory": p.include_memory, "state": p.state,
             "size_on_host": size_on_host(layer_files(vm_directory, p.layer, count) + (
                 [state_file(vm_directory, p.layer)] if p.include_memory else []))}
            for p in tree.snapshots],
    }


def freeze(path: Path) -> None:
    """A snapshot's layer is read-only: nothing but a rebase of ours writes it."""
    os.chmod(path, os.stat(path).st_mode & ~0o222)


def thaw(path: Path) -> None:
    os.chmod(path, os.stat(path).st_mode | 0o200)


def create_overlays(parents: list[Path], targets: list[Path], base_infos: list[DiskInfo],
                    context: OperationContext) -> None:
    """A new empty qcow2 over each parent (backing named relative to it); on any
    failure or cancel, the ones already made are removed."""
    made: list[Path] = []
    try:
        for parent, target, base in zip(parents, targets, base_infos, strict=True):
            target.parent.mkdir(parents=True, exist_ok=True)
            create_differencing(target, parent, scaled(context, 0, 0),
                                parent_info=base)
            made.append(target)
    except BaseException:
        for path in made:
            remove_quietly(path)
        raise


def rebase(child: Path, new_parent: Path, context: OperationContext,
           progress: tuple[float, float]) -> None:
    """Make ``child`` read the same bytes over ``new_parent`` (an image below its
    current parent): qemu-img copies into it what the layers in between held.
    Cancelable: until qemu-img rewrites the header last, ``child`` still names its
    old parent, and what it copied so far is what it read through it anyway."""
    backing = os.path.relpath(new_parent, child.parent)
    writable = bool(os.stat(child).st_mode & 0o200)
    if not writable:
        thaw(child)
    try:
        run_qemu_img(["rebase", "-p", "-f", "qcow2", "-F", format_for(new_parent),
                      "-b", backing, str(child)], context, progress_range=progress)
    finally:
        if not writable:
            freeze(child)


def parent_of(image: Path) -> Path | None:
    parent = info(image).parent
    return Path(os.path.realpath(parent)) if parent else None


def children_of(layer: Path, images: Iterable[Path]) -> list[Path]:
    """The images (among ``images``) whose backing file is ``layer``, from their headers."""
    real = Path(os.path.realpath(layer))
    return [image for image in images if image.exists() and parent_of(image) == real]


def orphans(vm_directory: Path, tree: Tree | None) -> list[Path]:
    """Files the tree does not name (layers, saved states): what a crashed operation
    left.  Hidden temporaries are `remove_stale_temporaries`'s."""
    folder = directory(vm_directory)
    if not folder.is_dir():
        return []
    named: set[str] = {TREE_FILE}
    if tree is not None:
        layers = [p.layer for p in tree.snapshots] + ([tree.present] if tree.present else [])
        named |= {f.name for layer in layers
                  for f in layer_files(vm_directory, layer, len(tree.bases))}
        for point in tree.snapshots:
            if point.include_memory:
                state = state_file(vm_directory, point.layer)
                named |= {state.name, state.name + ".json"}
    return [path for path in folder.iterdir()
            if path.is_file() and not path.name.startswith(".") and path.name not in named]
