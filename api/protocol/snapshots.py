"""What both sides know of snapshots and linked clones: names and record fields.

A VM's record carries its tree for producers in the ``snapshots`` field (JSON,
written by its host's worker after each change: ``{"present_parent": name | None,
"snapshots": [{name, parent, created, include_memory, state, size_on_host}]}``);
the worker's authority is the tree file beside the layers
(`workers.engines.snapshots`).  A linked clone's record names what it rests on in
``linked_clone_of`` (JSON ``{"vm": source, "snapshot": name}``).
"""

from __future__ import annotations

import json
import re
from typing import Any

from api.protocol import keys, vm

SNAPSHOT_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
TREE_FIELD = vm.Field.SNAPSHOTS
CLONE_FIELD = vm.Field.LINKED_CLONE_OF


def tree_of(record: dict[str, str]) -> dict[str, Any]:
    """The record's public tree (empty when the VM has no snapshots)."""
    text = record.get(TREE_FIELD)
    if not text:
        return {"present_parent": None, "snapshots": []}
    data: dict[str, Any] = json.loads(text)
    return data


def snapshot_names(record: dict[str, str]) -> list[str]:
    return [str(s["name"]) for s in tree_of(record)["snapshots"]]


def descendants(record: dict[str, str], name: str) -> list[str]:
    """``name`` and every snapshot below it in the record's tree."""
    found = [name]
    for point in tree_of(record)["snapshots"]:  # creation order: parents first
        if point["parent"] in found:
            found.append(point["name"])
    return found


def linked_clones(client: Any, source: str) -> dict[str, str]:
    """{clone VM: the snapshot of ``source`` it rests on}, from every VM record."""
    names = sorted(client.smembers(keys.VM_NAMES))
    if not names:
        return {}
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hget(keys.vm_record(name), CLONE_FIELD)
    clones: dict[str, str] = {}
    for name, link in zip(names, pipe.execute(), strict=True):
        if link:
            data = json.loads(link)
            if data.get("vm") == source:
                clones[name] = str(data.get("snapshot"))
    return clones
