"""The top image a live migration's destination creates over a copied chain."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.settings import Settings
from workers.engines.files import HostFiles
from workers.failures import DiskError
from workers.tasks.live_chain import create_top, syncs


def files(root: Path) -> HostFiles:
    return HostFiles.of(Settings(redis_url="redis://127.0.0.1:1/0", host="b",
                                 storage_root=root))


def test_an_undo_overlay_names_its_base_relative_to_itself(tmp_path: Path) -> None:
    here = files(tmp_path)
    below = [{"path": "d/base.raw", "format": "raw", "size": 1, "allocated": 0}]
    top = {"path": "vms/v/undo/0-base.qcow2", "format": "qcow2", "virtual_size": 1 << 20,
           "backing": "d/base.raw"}
    target = here.resolve_output(top["path"])
    assert create_top(here, top, target, below) == [
        "-u", "-b", "../../../d/base.raw", "-F", "raw", "-f", "qcow2", str(target),
        str(1 << 20)]


def test_a_disk_without_a_chain_is_created_empty_and_mirrored_whole(tmp_path: Path) -> None:
    here = files(tmp_path)
    top = {"path": "d/a.raw", "format": "raw", "virtual_size": 512, "backing": None}
    target = here.resolve_output(top["path"])
    assert create_top(here, top, target, []) == ["-f", "raw", str(target), "512"]
    assert syncs([top, {**top, "backing": "d/p.qcow2"}]) == ("full", "top")


def test_a_parent_the_source_did_not_send_is_refused(tmp_path: Path) -> None:
    here = files(tmp_path)
    top = {"path": "d/c.qcow2", "format": "qcow2", "virtual_size": 512,
           "backing": "../elsewhere.qcow2"}
    with pytest.raises(DiskError):
        create_top(here, top, here.resolve_output(top["path"]), [])
