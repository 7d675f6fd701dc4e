"""Snapshots across hosts (issue 23): a cold move carries the whole tree, a full clone
goes onto another host over the transfer channel.  Two real workers with separate
storage roots (alpha, beta), real qemu-img and qemu-nbd; bytes compared with
``qemu-img compare`` against raw exports taken before the move or the clone."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from api import VirtualServer, VMTaskResult, VMVMState, errors
from api.protocol import keys
from tests.faults import held, peer_of, restart
from tests.helpers import assert_succeeded as ok
from tests.helpers import digest, same
from tests.snapshot_files import export, layer, layer_files, new_vm, present, reads, tree, write
from workers.devtools.sandbox import RedisServer, WorkerProcess, wait_until

pytestmark = pytest.mark.slow
S = VMVMState


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    return "sr-" + request.node.name.replace("test_", "")[:24].strip("_")


def backing_of(image: Path) -> str | None:
    out = subprocess.run(["qemu-img", "info", "--output=json", "-U", str(image)],
                         capture_output=True, text=True, check=True).stdout
    backing: str | None = json.loads(out).get("backing-filename")
    return backing


def read_only(path: Path) -> bool:
    return stat.S_IMODE(os.stat(path).st_mode) & 0o222 == 0


def files_in(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if not p.is_dir()] if folder.exists() else []


def branches(root: Path, vm: Any, name: str, tmp_path: Path) -> dict[str, Path]:
    """s1, s2, back to s1, s3, and a present over s3; a raw export of each view."""
    write(root / name / "disk.qcow2", 0x11)
    ok(vm.create_snapshot("s1"))
    write(present(root, name), 0x22, "1M")
    ok(vm.create_snapshot("s2"))
    ok(vm.revert_to_snapshot("s1"))
    write(present(root, name), 0x33, "2M")
    ok(vm.create_snapshot("s3"))
    write(present(root, name), 0x44, "3M")
    views = {s: export(layer(root, name, s), tmp_path / f"{s}.raw") for s in ("s1", "s2", "s3")}
    views["present"] = export(present(root, name), tmp_path / "present.raw")
    return views


def test_a_vm_with_snapshots_moves_cold_with_its_tree(
        both: VirtualServer, root: Path, beta: WorkerProcess, name: str,
        tmp_path: Path) -> None:
    vm = new_vm(both, name)
    views = branches(root, vm, name, tmp_path)
    before = (tree(root, name), layer_files(root, name))
    task = vm.migrate("beta")
    ok(task)
    assert task.snapshot().output["snapshots"] == 3
    there = beta.storage_root
    assert vm.state is S.TurnedOff and vm.host == "beta"  # the read updates the host
    assert (tree(there, name), layer_files(there, name)) == before
    for point in ("s1", "s2", "s3"):
        assert same(layer(there, name, point), views[point]), point
        assert read_only(layer(there, name, point))
    assert same(present(there, name), views["present"])
    # Every chain names its backing relative to its own folder: nothing points back
    # into the source's root.
    for image in (there / "vms" / name / "snapshots").glob("*.qcow2"):
        backing = backing_of(image)
        assert backing is not None and not backing.startswith("/"), (image, backing)
    assert not (root / "vms" / name).exists() and not (root / name / "disk.qcow2").exists()
    assert [(s.name, s.parent) for s in vm.snapshots] == [("s1", None), ("s2", "s1"),
                                                          ("s3", "s1")]
    # The tree works there: revert, delete, every other view unchanged.
    ok(vm.revert_to_snapshot("s2"))
    assert same(present(there, name), views["s2"])
    ok(vm.delete_snapshot("s1"))
    for point in ("s2", "s3"):
        assert same(layer(there, name, point), views[point]), point
    ok(vm.delete())
    assert not (there / "vms" / name).exists()


def test_a_saved_vm_moves_with_its_points_of_memory(
        both: VirtualServer, root: Path, beta: WorkerProcess, name: str) -> None:
    """A point with memory keeps its saved state beside its layer: it moves with the
    tree, and the VM restores there, from its own state and from the point's."""
    vm = new_vm(both, name)
    ok(vm.startup())  # no bootable disk: SeaBIOS runs, which is enough to save and restore
    ok(vm.save())
    ok(vm.create_snapshot("mem"))
    data = tree(root, name)
    assert data is not None
    state = Path("vms", name, "snapshots", f"{data['snapshots'][0]['layer']}.state")  # type: ignore[index]
    before = digest(root / state)
    ok(vm.migrate("beta"))
    assert vm.state is S.Saved and vm.host == "beta"
    there = beta.storage_root
    assert digest(there / state) == before and not (root / "vms" / name).exists()
    ok(vm.startup())  # a restore of the VM's own saved state, on beta's paths
    assert vm.state is S.Running
    ok(vm.turn_off())
    ok(vm.revert_to_snapshot("mem"))  # the point's state, moved with the tree
    assert vm.state is S.Saved
    ok(vm.startup())
    assert vm.state is S.Running
    ok(vm.turn_off())
    ok(vm.delete())


def test_full_clones_onto_another_host(both: VirtualServer, root: Path,
                                       beta: WorkerProcess, name: str, tmp_path: Path) -> None:
    vm = new_vm(both, name)
    write(root / name / "disk.qcow2", 0x11)
    ok(vm.create_snapshot("s1"))
    write(present(root, name), 0x22, "1M")
    views = {"s1": export(layer(root, name, "s1"), tmp_path / "s1.raw"),
             "present": export(present(root, name), tmp_path / "present.raw")}
    source = both.redis.hgetall(keys.vm_record(name))
    there = beta.storage_root
    for clone, point in ((f"{name}-s", "s1"), (f"{name}-p", None)):
        task = vm.clone(clone, host="beta", snapshot=point)
        assert task.host == "beta" and task.is_cancelable
        ok(task)
        output = task.snapshot().output
        assert (output["host"], output["snapshot"], output["linked"]) == ("beta", point, False)
        record = both.redis.hgetall(keys.vm_record(clone))
        assert record["host"] == "beta" and record["port_forwards"] == "[]"
        assert record["mac"] != source["mac"] and record["memory_mb"] == source["memory_mb"]
        assert both.redis.sismember(keys.host_vms("beta"), clone)
        disk = there / json.loads(record["disks"])[0]
        assert backing_of(disk) is None  # flattened: independent of the source
        assert same(disk, views[point or "present"])
        serve = peer_of(both, task, "server_task_id")
        assert serve.wait_for_completion(10_000) and serve.snapshot().host == "alpha"
        assert serve.snapshot().output == {"served": 1}
        assert not both.redis.keys(keys.transfer("*"))
    # The source is untouched and the clone runs on beta.
    assert same(present(root, name), views["present"]) and vm.host == "alpha"
    assert [s.name for s in vm.snapshots] == ["s1"]
    clone_vm = both.find_virtual_machine(f"{name}-p")
    assert clone_vm is not None
    ok(clone_vm.startup())  # no bootable disk: SeaBIOS runs, enough to be Running
    assert clone_vm.state is S.Running and clone_vm.host == "beta"
    ok(clone_vm.turn_off())
    for clone in (f"{name}-s", f"{name}-p"):
        found = both.find_virtual_machine(clone)
        assert found is not None
        ok(found.delete())
        assert not (there / "vms" / clone).exists()
    ok(vm.delete())


def test_refusals_across_hosts(both: VirtualServer, root: Path, name: str) -> None:
    vm = new_vm(both, name)
    ok(vm.create_snapshot("s1"))
    queued = both.tasks(limit=1)[0].id
    with pytest.raises(errors.InvalidArgumentError, match="linked clone stays"):
        vm.clone(f"{name}-c", linked=True, snapshot="s1", host="beta")
    with pytest.raises(errors.HostUnavailableError):
        vm.clone(f"{name}-c", host="nowhere")
    assert both.tasks(limit=1)[0].id == queued  # nothing queued
    ok(vm.clone(f"{name}-l", linked=True, snapshot="s1"))
    linked = both.find_virtual_machine(f"{name}-l")
    assert linked is not None
    queued = both.tasks(limit=1)[0].id
    with pytest.raises(errors.InvalidStateError, match="linked clones rest"):
        vm.migrate("beta")
    with pytest.raises(errors.InvalidStateError, match="linked clone"):
        linked.migrate("beta")
    assert both.tasks(limit=1)[0].id == queued
    ok(linked.delete())
    ok(vm.delete())


def test_a_running_vm_with_snapshots_moves_live_with_its_tree(
        both: VirtualServer, root: Path, beta: WorkerProcess, name: str,
        tmp_path: Path) -> None:
    """Live: the present is mirrored, every other file of the tree goes byte for byte
    first (the layers below the present with the chain, the other branch's too).
    There and back: the source kept nothing that would clash on the way back."""
    ok(both.create_dynamic_virtual_hard_disk(f"{name}/disk.qcow2", 16))
    vm = both.create_virtual_machine(name, memory_mb=64, disks=[f"{name}/disk.qcow2"],
                                     network=None)
    views = branches(root, vm, name, tmp_path)
    before = (tree(root, name), layer_files(root, name))
    ok(vm.startup())  # no bootable disk: SeaBIOS runs, enough to be Running
    there = beta.storage_root
    for host, here, away in (("beta", there, root), ("alpha", root, there)):
        ok(vm.migrate(host))
        assert vm.state is S.Running and vm.host == host  # the read updates the host
        assert (tree(here, name), layer_files(here, name)) == before
        assert not (away / "vms" / name).exists() and files_in(away / name) == []
        for point in ("s1", "s2", "s3"):
            assert read_only(layer(here, name, point))
    ok(vm.turn_off())
    for point in ("s1", "s2", "s3"):
        assert same(layer(root, name, point), views[point]), point
    assert same(present(root, name), views["present"])
    ok(vm.revert_to_snapshot("s2"))
    assert same(present(root, name), views["s2"])
    ok(vm.delete())


def test_cancelled_clone_and_move_leave_nothing(
        both: VirtualServer, root: Path, beta: WorkerProcess, name: str,
        tmp_path: Path) -> None:
    vm = new_vm(both, name, size_mb=64)
    write(root / name / "disk.qcow2", 0x11, "0", "48M")
    ok(vm.create_snapshot("s1"))
    write(present(root, name), 0x22, "0", "8M")
    before = (tree(root, name), layer_files(root, name))
    view = export(present(root, name), tmp_path / "present.raw")
    there = beta.storage_root
    for start in (lambda: vm.clone(f"{name}-c", host="beta"), lambda: vm.migrate("beta")):
        task = start()
        with held(task.id):  # the pull stands mid-way
            task.cancel()
        assert task.wait_for_completion(60_000)
        assert task.result is VMTaskResult.Cancelled, task.error_description
        source = peer_of(both, task, "server_task_id")
        assert source.wait_for_completion(30_000)
        assert both.find_virtual_machine(f"{name}-c") is None
        assert not (there / "vms" / f"{name}-c").exists()
        # No file (a cancelled pull leaves at most the empty folder of the base, as
        # a cancelled disk copy does).
        assert not (there / "vms" / name).exists() and files_in(there / name) == []
        assert not both.redis.keys(keys.transfer("*"))
        assert vm.host == "alpha" and (tree(root, name), layer_files(root, name)) == before
        assert same(present(root, name), view)
    ok(vm.delete())


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[RedisServer, WorkerProcess, WorkerProcess]]:
    redis = RedisServer(tmp_path / "redis", appendonly=True).start()
    lease = {"VMTASK_LEASE_SECONDS": "3"}
    started = [WorkerProcess(redis.url, host, tmp_path / host, tmp_path, concurrency=2,
                             env=lease).start() for host in ("sma", "smb")]
    yield redis, started[0], started[1]
    for worker in started:
        worker.stop()
    redis.stop()


def test_kill_9_and_a_redis_restart_mid_clone_or_move(
        pair: tuple[RedisServer, WorkerProcess, WorkerProcess]) -> None:
    redis, source, destination = pair
    root, there = source.storage_root, destination.storage_root
    with VirtualServer(redis.url, host="sma", poll_interval=0.2) as server:
        vm = new_vm(server, "kv", size_mb=64)
        write(root / "kv" / "disk.qcow2", 0x5A, "0", "48M")
        ok(vm.create_snapshot("s1"))
        cases: list[tuple[WorkerProcess, Callable[[], None]]] = [
            # The source's worker: the pull finds its export gone and its task dead.
            (source, lambda: None),
            # The destination's: its clone folder waits for its restart to go.
            (destination, lambda: wait_until(lambda: not (there / "vms" / "k").exists(),
                                             60, "the unfinished clone removed")),
        ]
        for killed, after_restart in cases:
            task = vm.clone("k", host="smb", snapshot="s1")
            with held(task.id):
                killed.kill()
            assert task.wait_for_completion(30_000)
            assert task.result is VMTaskResult.ThreadCrashError, task.error_description
            killed.start()
            after_restart()
            assert server.find_virtual_machine("k") is None
            assert not (there / "vms" / "k").exists()
            assert [p.name for p in there.rglob("*") if p.is_file()
                    and ".lock" not in p.name] == []
        # A Redis restart mid-pull is ridden out by both sides; the source's lock
        # is free again after the kills.
        task = vm.clone("k", host="smb", snapshot="s1")
        with held(task.id):
            restart(redis)
        ok(task)
        reads(there / "vms" / "k" / "disks" / f"0-{layer(root, 'kv', 's1').stem}.qcow2",
              0x5A, "0", "48M")
        # A move with its tree, its destination killed mid-pull: the move never
        # happened, the restart removes what it pulled, and the move then succeeds.
        before = (tree(root, "kv"), layer_files(root, "kv"))
        task = vm.migrate("smb")
        with held(task.id):
            destination.kill()
        assert task.wait_for_completion(30_000)
        assert task.result is VMTaskResult.ThreadCrashError, task.error_description
        destination.start()
        wait_until(lambda: not (there / "vms" / "kv").exists(), 60, "the unfinished move removed")
        assert files_in(there / "kv") == []
        assert vm.host == "sma" and (tree(root, "kv"), layer_files(root, "kv")) == before
        ok(vm.migrate("smb"))
        assert vm.state is S.TurnedOff and vm.host == "smb"
        reads(layer(there, "kv", "s1"), 0x5A, "0", "48M")
