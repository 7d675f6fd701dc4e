"""The pure decisions of backups: when an incremental can be trusted, what a prune
keeps resting on what, and the repository's atomic index (no QEMU, no Redis)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from workers.engines.backups import job
from workers.engines.backups import repository as repo
from workers.failures import IllegalValue
from workers.tasks.backups import _plan


def entry(backup_id: str, parent: str | None, vm: str = "web",
          disks: list[str] | None = None, sizes: list[int] | None = None) -> repo.Entry:
    return repo.Entry(id=backup_id, vm=vm, created=0.0, kind="full" if parent is None
                      else "incremental", parent=parent, disks=disks or ["web/d.qcow2"],
                      sizes=sizes or [1 << 30])


def healthy(index: repo.Index, backup_id: str) -> list[dict[str, dict[str, Any]]]:
    name = job.bitmap_name(index.id, backup_id)
    return [{name: {"name": name, "persistent": True, "inconsistent": False}}]


def test_plan_is_incremental_only_when_everything_holds() -> None:
    index = repo.Index(id="ab" * 16, backups=[entry("b1", None), entry("b2", "b1"),
                                              entry("o1", None, vm="other")])
    disks, sizes = ["web/d.qcow2"], [1 << 30]
    parent, reason = _plan(index, "web", disks, sizes, healthy(index, "b2"), False)
    assert parent is not None and parent.id == "b2" and "incremental" in reason
    cases = [
        (_plan(index, "new", disks, sizes, healthy(index, "b2"), False), "first backup"),
        (_plan(index, "web", disks, sizes, healthy(index, "b2"), True), "asked for"),
        (_plan(index, "web", [*disks, "web/e.qcow2"], [*sizes, 1], healthy(index, "b2"),
               False), "disks changed"),
        (_plan(index, "web", disks, [2 << 30], healthy(index, "b2"), False), "resized"),
        (_plan(index, "web", disks, sizes, healthy(index, "b1"), False), "no dirty bitmap"),
        (_plan(index, "web", disks, sizes, [{}], False), "no dirty bitmap"),
    ]
    for (parent, reason), why in cases:
        assert parent is None and why in reason, reason
    broken = healthy(index, "b2")
    next(iter(broken[0].values()))["inconsistent"] = True
    assert "inconsistent" in _plan(index, "web", disks, sizes, broken, False)[1]
    transient = healthy(index, "b2")
    next(iter(transient[0].values()))["persistent"] = False
    assert "not persistent" in _plan(index, "web", disks, sizes, transient, False)[1]


def test_bitmap_names_are_per_repository() -> None:
    one, two = "1" * 32, "2" * 32
    assert job.bitmap_name(one, "b") != job.bitmap_name(two, "b")
    assert job.bitmap_name(one, "b").startswith(job.bitmap_prefix(one))
    assert not job.bitmap_name(two, "b").startswith(job.bitmap_prefix(one))


def test_index_chain_children_and_round_trip(tmp_path: Path) -> None:
    index = repo.Index(id="c" * 32, backups=[entry("b1", None), entry("b2", "b1"),
                                             entry("b3", "b2")])
    assert [e.id for e in index.chain("b3")] == ["b3", "b2", "b1"]
    assert [e.id for e in index.children("b1")] == ["b2"]
    assert index.latest("web") is index.backups[-1] and index.latest("nobody") is None
    with pytest.raises(IllegalValue):
        index.chain("missing")
    repo.store(tmp_path, index)
    assert repo.load(tmp_path) == index
    assert json.loads((tmp_path / repo.INDEX).read_text())["version"] == repo.VERSION
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary was renamed over the index


def test_leftovers_are_unlisted_folders_only(tmp_path: Path) -> None:
    index = repo.Index(id="d" * 32, backups=[entry("b1", None)])
    for folder in ("b1", ".b2.partial", "b3"):
        (tmp_path / folder).mkdir()
    repo.store(tmp_path, index)
    assert sorted(repo.remove_leftovers(tmp_path, index)) == [".b2.partial", "b3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b1", repo.INDEX]


def test_a_new_repository_has_an_empty_index_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    fresh = repo.load(tmp_path / "none")
    assert fresh.backups == [] and len(fresh.id) == 32
    (tmp_path / repo.INDEX).write_text('{"version": 99}')
    with pytest.raises(IllegalValue):
        repo.load(tmp_path)


def test_backup_ids_sort_by_time_and_match_the_producers_pattern() -> None:
    from api.protocol.backups import BACKUP_ID

    made = repo.new_backup_id()
    assert BACKUP_ID.fullmatch(made), made


def test_one_writer_at_a_time_readers_together(tmp_path: Path) -> None:
    with repo.locked(tmp_path, exclusive=True):
        for exclusive in (True, False):
            with pytest.raises(IllegalValue, match="in use"), \
                    repo.locked(tmp_path, exclusive=exclusive):
                pass
    with repo.locked(tmp_path, exclusive=False), repo.locked(tmp_path, exclusive=False):
        with pytest.raises(IllegalValue), repo.locked(tmp_path, exclusive=True):
            pass


def test_a_waiting_task_pauses_until_the_holder_lets_go(tmp_path: Path) -> None:
    pauses: list[int] = []
    with repo.locked(tmp_path, exclusive=True):
        def pause() -> None:
            pauses.append(1)
            if len(pauses) == 3:
                raise KeyboardInterrupt  # as a cancel raises out of the wait
        with pytest.raises(KeyboardInterrupt), repo.locked(tmp_path, exclusive=True,
                                                           pause=pause):
            pass
    assert len(pauses) == 3
    with repo.locked(tmp_path, exclusive=True, pause=pause):  # free now: no pause
        pass
    assert len(pauses) == 3
