"""Snapshots and clones of TurnedOff VMs (issue 23, first part): real qemu-img, real
workers, real Redis.  Bytes are written into the images with qemu-io while the VM is
off and checked with ``qemu-io read -P`` and ``qemu-img compare``."""

from __future__ import annotations

import fcntl
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from api import VirtualServer, VMTaskResult, VMVMState, errors
from api.protocol import keys
from tests.guests import add_guest, boot_id, wait_for_agent
from tests.helpers import assert_succeeded as ok
from tests.helpers import backing_chain, same
from tests.snapshot_files import export, layer, layer_files, new_vm, present, reads, tree, write
from workers.devtools.sandbox import RedisServer, WorkerProcess, wait_until

S = VMVMState


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    return request.node.name.replace("test_", "")[:30].strip("_")


def newest_task_id(server: VirtualServer) -> str | None:
    recent = server.tasks(limit=1)
    return recent[0].id if recent else None


# -- the tree ----------------------------------------------------------------------------


def test_create_revert_delete_round_trip(server: VirtualServer, root: Path, name: str) -> None:
    vm = new_vm(server, name)
    base = root / name / "disk.qcow2"
    write(base, 0x11)
    task = vm.create_snapshot("s1")
    assert task.is_cancelable
    ok(task)
    output = task.snapshot().output
    assert (output["name"], output["parent"], output["include_memory"], output["state"],
            output["is_current"], output["paused_ms"]) == ("s1", None, False, 1, True, 0)
    write(present(root, name), 0x22)
    ok(vm.create_snapshot("s2", include_memory=False))
    write(present(root, name), 0x33)
    write(present(root, name), 0x44, "2M")
    points = vm.snapshots
    assert [(p.name, p.parent, p.state, p.include_memory, p.is_current) for p in points] == [
        ("s1", None, S.TurnedOff, False, True), ("s2", "s1", S.TurnedOff, False, True)]
    assert points[1].size_on_host >= 1024 * 1024  # s2's layer holds the 0x22 MiB
    assert points[0].created <= points[1].created
    # Layers are read-only; the base is untouched by everything after s1.
    assert os.stat(layer(root, name, "s2")).st_mode & 0o222 == 0
    reads(base, 0x11)
    assert vm.state is S.TurnedOff

    ok(vm.revert_to_snapshot("s1"))
    reads(present(root, name), 0x11)
    reads(present(root, name), 0x00, "2M")
    assert [p.is_current for p in vm.snapshots] == [True, False]
    ok(vm.revert_to_snapshot("s2"))
    reads(present(root, name), 0x22)
    reads(present(root, name), 0x00, "2M")
    write(present(root, name), 0x55, "4M")

    ok(vm.delete_snapshot("s1"))
    assert [(p.name, p.parent) for p in vm.snapshots] == [("s2", None)]
    reads(present(root, name), 0x22)
    reads(present(root, name), 0x55, "4M")
    ok(vm.delete_snapshot("s2"))
    # The last point gone: the present is folded into the base, the VM is plain again.
    assert vm.snapshots == [] and tree(root, name) is None
    assert layer_files(root, name) == set()
    reads(base, 0x22)
    reads(base, 0x55, "4M")
    assert backing_chain(base) == [("disk.qcow2", None)]
    assert vm.state is S.TurnedOff
    ok(vm.delete())


def test_branches_revert_right(server: VirtualServer, root: Path, name: str) -> None:
    vm = new_vm(server, name)
    write(root / name / "disk.qcow2", 0x01)
    ok(vm.create_snapshot("s1"))
    write(present(root, name), 0x0A)
    ok(vm.create_snapshot("s2"))
    ok(vm.revert_to_snapshot("s1"))
    reads(present(root, name), 0x01)
    write(present(root, name), 0x0B)
    ok(vm.create_snapshot("s3"))
    parents = {p.name: p.parent for p in vm.snapshots}
    assert parents == {"s1": None, "s2": "s1", "s3": "s1"}
    assert {p.name: p.is_current for p in vm.snapshots} == {"s1": True, "s2": False,
                                                           "s3": True}
    for point, pattern in (("s2", 0x0A), ("s3", 0x0B), ("s1", 0x01), ("s2", 0x0A)):
        ok(vm.revert_to_snapshot(point))
        reads(present(root, name), pattern)
    ok(vm.delete())
    assert not (root / "vms" / name).exists()


def test_deleting_a_point_keeps_every_other_view(server: VirtualServer, root: Path,
                                                 name: str, tmp_path: Path) -> None:
    """s1 <- s2 <- {s3, s4 (a branch)} <- present: deleting s2, which has two children
    and data of its own, then the root s1, changes no byte anyone else reads."""
    vm = new_vm(server, name)
    write(root / name / "disk.qcow2", 0x10)
    ok(vm.create_snapshot("s1"))
    write(present(root, name), 0x20, "1M")
    ok(vm.create_snapshot("s2"))
    write(present(root, name), 0x30, "2M")
    ok(vm.create_snapshot("s3"))
    ok(vm.revert_to_snapshot("s2"))
    write(present(root, name), 0x40, "3M")
    ok(vm.create_snapshot("s4"))
    write(present(root, name), 0x50, "0")
    views = {s: export(layer(root, name, s), tmp_path / f"{s}.raw") for s in ("s1", "s3", "s4")}
    views["present"] = export(present(root, name), tmp_path / "present.raw")
    assert not same(layer(root, name, "s3"), views["s4"])  # the check can fail

    ok(vm.delete_snapshot("s2"))
    assert {p.name: p.parent for p in vm.snapshots} == {"s1": None, "s3": "s1", "s4": "s1"}
    for point in ("s1", "s3", "s4"):
        assert same(layer(root, name, point), views[point]), point
    assert same(present(root, name), views["present"])
    assert len(layer_files(root, name)) == 4  # s1, s3, s4 and the present

    ok(vm.delete_snapshot("s1"))
    assert {p.name: p.parent for p in vm.snapshots} == {"s3": None, "s4": None}
    for point in ("s3", "s4"):
        assert same(layer(root, name, point), views[point]), point
    assert same(present(root, name), views["present"])
    ok(vm.revert_to_snapshot("s3"))
    assert same(present(root, name), views["s3"])
    ok(vm.delete())


def hold_vm_lock(root: Path, name: str) -> int:
    folder = root / "vms" / name
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_cancelled_create_and_revert_leave_no_trace(server: VirtualServer, root: Path,
                                                    name: str) -> None:
    vm = new_vm(server, name)
    write(root / name / "disk.qcow2", 0x11)
    ok(vm.create_snapshot("s1"))
    write(present(root, name), 0x22)
    before = (layer_files(root, name), tree(root, name))
    for start in (lambda: vm.create_snapshot("s2"), lambda: vm.revert_to_snapshot("s1")):
        # The task starts, then waits for the VM's lock, held here until it ends.
        fd = hold_vm_lock(root, name)
        try:
            task = start()
            wait_until(lambda: task.snapshot().state == "STARTED", 30,  # noqa: B023
                       "the task started")
            task.cancel()
            assert task.wait_for_completion(60_000)
        finally:
            os.close(fd)
        assert task.result is VMTaskResult.Cancelled
        assert (layer_files(root, name), tree(root, name)) == before
        assert [p.name for p in vm.snapshots] == ["s1"]
        reads(present(root, name), 0x22)
    ok(vm.delete())


@pytest.mark.slow
def test_a_delete_cancelled_mid_rebase_changes_nothing(server: VirtualServer, root: Path,
                                                       name: str, tmp_path: Path) -> None:
    vm = new_vm(server, name, size_mb=1024)
    ok(vm.create_snapshot("s1"))
    write(present(root, name), 0xAB, "0", "768M")
    ok(vm.create_snapshot("s2"))
    write(present(root, name), 0xCD, "0", "1M")
    views = {s: export(layer(root, name, s), tmp_path / f"{s}.raw") for s in ("s1", "s2")}
    views["present"] = export(present(root, name), tmp_path / "present.raw")
    before = (layer_files(root, name), tree(root, name))
    task = vm.delete_snapshot("s2")
    wait_until(lambda: task.snapshot().percent_completed >= 1 or task.is_complete, 120,
               "the rebase under way")
    task.cancel()
    assert task.wait_for_completion(120_000)
    assert task.result is VMTaskResult.Cancelled, task.error_description
    assert (layer_files(root, name), tree(root, name)) == before
    assert [p.name for p in vm.snapshots] == ["s1", "s2"]
    assert vm.state is S.TurnedOff
    for point in ("s1", "s2"):
        assert same(layer(root, name, point), views[point])
    assert same(present(root, name), views["present"])
    ok(vm.delete_snapshot("s2"))  # and deleting again finishes the job
    assert same(present(root, name), views["present"])
    ok(vm.delete())


def test_a_saved_vm_keeps_its_state_in_its_snapshots(server: VirtualServer, root: Path,
                                                     name: str) -> None:
    vm = new_vm(server, name)
    state_file = root / "vms" / name / "saved.state"
    ok(vm.startup())  # no bootable disk: SeaBIOS runs, which is enough to save and restore
    ok(vm.save())
    ok(vm.create_snapshot("mem"))
    ok(vm.create_snapshot("disk", include_memory=False))
    assert [(p.name, p.state, p.include_memory) for p in vm.snapshots] == [
        ("mem", S.Saved, True), ("disk", S.Saved, False)]
    assert vm.snapshots[0].size_on_host > 1024 * 1024  # the point holds the RAM
    assert vm.state is S.Saved
    since = server.redis.xrevrange("vmtask:vm-events", count=1)[0][0]
    ok(vm.startup())  # a restore on the new present: the fingerprint follows it
    changes = [(e.old, e.new) for e in server.vm_events(since, timeout_ms=200)
               if e.name == name]
    assert changes == [(S.Saved, S.Restoring), (S.Restoring, S.Running)]
    ok(vm.turn_off())
    assert not state_file.exists()

    ok(vm.revert_to_snapshot("mem"))  # back to the point's saved state
    assert vm.state is S.Saved and state_file.exists()
    ok(vm.startup())
    assert vm.state is S.Running
    ok(vm.save())
    ok(vm.revert_to_snapshot("disk"))  # disks only: the present's state goes with it
    assert vm.state is S.TurnedOff and not state_file.exists()
    ok(vm.revert_to_snapshot("mem"))
    assert vm.state is S.Saved
    ok(vm.delete_snapshot("disk"))
    assert vm.state is S.Saved
    ok(vm.delete_snapshot("mem"))  # the last: the present folds into the base
    assert vm.state is S.Saved and tree(root, name) is None
    assert not (root / "vms" / name / "snapshots").exists() or \
        not list((root / "vms" / name / "snapshots").iterdir())
    ok(vm.startup())  # and the state restores on the base disk
    assert vm.state is S.Running
    ok(vm.turn_off())
    ok(vm.delete())


# -- clones -------------------------------------------------------------------------------


def test_linked_clone_reads_the_snapshot_and_blocks_deletion(
        server: VirtualServer, root: Path, name: str) -> None:
    vm = new_vm(server, name)
    write(root / name / "disk.qcow2", 0x11)
    ok(vm.create_snapshot("s1"))
    write(present(root, name), 0x22)
    ok(vm.create_snapshot("s2"))
    task = vm.clone(f"{name}-c", linked=True, snapshot="s1")
    ok(task)
    clone = server.find_virtual_machine(f"{name}-c")
    assert clone is not None and clone.state is S.TurnedOff
    details, source = clone.details, vm.details
    assert details["mac"] != source["mac"] and details["port_forwards"] == {}
    assert (details["memory_mb"], details["cpus"], details["network"]) == (
        source["memory_mb"], source["cpus"], source["network"])
    disk = root / details["disks"][0]
    assert disk.is_relative_to(root / "vms" / f"{name}-c")
    assert backing_chain(disk)[1][0] == layer(root, name, "s1").name
    reads(disk, 0x11)
    write(disk, 0x99)  # the clone's writes stay its own
    reads(present(root, name), 0x22)
    ok(vm.revert_to_snapshot("s1"))
    reads(present(root, name), 0x11)
    queued = newest_task_id(server)
    for refused in (lambda: vm.delete_snapshot("s1"), vm.delete):
        with pytest.raises(errors.InvalidStateError, match=f"{name}-c"):
            refused()
    assert newest_task_id(server) == queued
    ok(vm.delete_snapshot("s2"))  # nothing rests on s2
    ok(clone.delete())
    assert not (root / "vms" / f"{name}-c").exists()
    ok(vm.delete_snapshot("s1"))
    ok(vm.delete())


def test_the_worker_refuses_deleting_what_a_linked_clone_rests_on(
        server: VirtualServer, root: Path, name: str) -> None:
    """A producer that skipped its checks meets the worker's own: a result, no change."""
    from api.protocol import tasks

    vm = new_vm(server, name)
    ok(vm.create_snapshot("s1"))
    ok(vm.clone(f"{name}-c", linked=True, snapshot="s1"))
    move = {"destination_host": "beta", "transfer_id": "t-1", "client_task_id": "c-1"}
    for spec, kwargs in ((tasks.VM_DELETE_SNAPSHOT, {"snapshot": "s1"}), (tasks.VM_DELETE, {}),
                         (tasks.VM_MIGRATE_OUT, move)):
        task = server.submit(spec, description="forced", kwargs={"name": name, **kwargs},
                             host=vm.host)
        assert task.wait_for_completion(60_000)
        assert task.error == errors.InvalidStateError.default_hresult, task.error_description
        assert "linked clone" in task.error_description or "snapshots" in task.error_description
    assert [p.name for p in vm.snapshots] == ["s1"] and vm.state is S.TurnedOff
    ok(server.find_virtual_machine(f"{name}-c").delete())  # type: ignore[union-attr]
    ok(vm.delete())


def test_full_clones_are_independent(server: VirtualServer, root: Path, name: str) -> None:
    vm = new_vm(server, name)
    write(root / name / "disk.qcow2", 0x11)
    ok(vm.create_snapshot("s1"))
    write(present(root, name), 0x22, "1M")
    ok(vm.clone(f"{name}-now"))
    ok(vm.clone(f"{name}-s1", snapshot="s1"))
    now = server.find_virtual_machine(f"{name}-now")
    at_s1 = server.find_virtual_machine(f"{name}-s1")
    assert now is not None and at_s1 is not None
    now_disk, s1_disk = root / now.details["disks"][0], root / at_s1.details["disks"][0]
    for disk in (now_disk, s1_disk):
        assert len(backing_chain(disk)) == 1  # flattened: no backing file
    reads(now_disk, 0x11)
    reads(now_disk, 0x22, "1M")
    reads(s1_disk, 0x11)
    reads(s1_disk, 0x00, "1M")
    ok(vm.delete())  # the source goes; the full clones keep their bytes
    reads(now_disk, 0x22, "1M")
    ok(now.delete())
    ok(at_s1.delete())


def test_a_cancelled_clone_leaves_no_vm_and_no_file(server: VirtualServer, root: Path,
                                                    name: str) -> None:
    vm = new_vm(server, name)
    fd = hold_vm_lock(root, name)
    try:
        task = vm.clone(f"{name}-c")
        wait_until(lambda: task.snapshot().state == "STARTED", 30, "the clone started")
        task.cancel()
        assert task.wait_for_completion(60_000)
    finally:
        os.close(fd)
    assert task.result is VMTaskResult.Cancelled
    assert server.find_virtual_machine(f"{name}-c") is None
    assert not (root / "vms" / f"{name}-c").exists()
    ok(vm.delete())


# -- refusals -------------------------------------------------------------------------------


def test_refusals_before_queueing(server: VirtualServer, root: Path, name: str) -> None:
    vm = new_vm(server, name)
    undoable = server.create_virtual_machine(f"{name}-u", memory_mb=64,
                                             disks=[f"{name}/disk.qcow2"], undoable=True)
    ok(vm.create_snapshot("s1"))
    base = server.get_hard_disk(f"{name}/disk.qcow2")  # a quick task, queued before
    queued = newest_task_id(server)
    bad_names = ("", "a b", "../x", "x" * 65, "a/b", None, 3)
    for bad in bad_names:
        for call in (vm.create_snapshot, vm.revert_to_snapshot, vm.delete_snapshot):
            with pytest.raises(errors.InvalidArgumentError):
                call(bad)  # type: ignore[arg-type]
    invalid_arguments = [
        lambda: vm.create_snapshot("s1"),               # taken
        lambda: vm.revert_to_snapshot("nope"),          # unknown
        lambda: vm.delete_snapshot("nope"),
        lambda: vm.clone(f"{name}-c", linked=True),     # linked needs a snapshot
        lambda: vm.clone(f"{name}-c", snapshot="nope"),
        lambda: vm.clone(name),                         # the name is taken
        lambda: vm.clone("bad name"),
        lambda: vm.create_snapshot("s9", include_memory="yes"),  # type: ignore[arg-type]
    ]
    for call in invalid_arguments:
        with pytest.raises(errors.InvalidArgumentError):
            call()
    with pytest.raises(errors.InvalidStateError, match="undo"):
        undoable.create_snapshot("s1")
    diskless = server.create_virtual_machine(f"{name}-n", memory_mb=64)
    with pytest.raises(errors.InvalidArgumentError, match="no disks"):
        diskless.create_snapshot("s1")
    with pytest.raises(errors.InvalidStateError, match="snapshots"):
        vm.configure(disks=[])
    with pytest.raises(errors.InvalidStateError, match="base of the snapshots"):
        base.resize(32)
    assert newest_task_id(server) == queued
    ok(diskless.delete())
    ok(undoable.delete())
    ok(vm.delete())


def test_a_running_vm_runs_on_its_present(server: VirtualServer, root: Path,
                                         name: str) -> None:
    """(Its snapshots and clones while it runs: test_snapshots_live.)"""
    vm = new_vm(server, name)
    ok(vm.create_snapshot("s1"))
    ok(vm.startup())  # no bootable disk: SeaBIOS runs, which is enough to be Running
    try:
        assert vm.state is S.Running
        # It runs on its present overlay, not on the base frozen under s1.
        pid = int((root / "vms" / name / "qemu.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert b"/proc/self/fd/" in cmdline or present(root, name).name.encode() in cmdline
    finally:
        ok(vm.turn_off())
    ok(vm.delete())


# -- restarts ---------------------------------------------------------------------------------


@pytest.fixture
def private(tmp_path: Path) -> Iterator[tuple[RedisServer, WorkerProcess, Path]]:
    redis = RedisServer(tmp_path / "redis", appendonly=True).start()
    worker = WorkerProcess(redis.url, "snaphost", tmp_path / "root", tmp_path,
                           concurrency=1, env={"VMTASK_LEASE_SECONDS": "3"}).start()
    yield redis, worker, tmp_path
    worker.stop()
    redis.stop()


@pytest.mark.slow
def test_the_tree_survives_a_worker_and_redis_restart(
        private: tuple[RedisServer, WorkerProcess, Path]) -> None:
    redis, worker, _base = private
    root = worker.storage_root
    with VirtualServer(redis.url, host="snaphost", poll_interval=0.5) as server:
        vm = new_vm(server, "keep")
        ok(vm.create_snapshot("s1"))
        ok(vm.create_snapshot("s2"))
        expected = [(p.name, p.parent) for p in vm.snapshots]
        # The worker dies after a create left a layer no tree names; Redis loses the
        # record's copy of the tree (a write it never made durable).
        worker.kill()
        stray = root / "vms" / "keep" / "snapshots" / "deadbeef0000-0.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(stray), "1M"],
                       check=True)
        server.redis.hdel(keys.vm_record("keep"), "snapshots")
        redis.stop()
        redis.start()
        worker.start()
        wait_until(lambda: bool(server.redis.hget(keys.vm_record("keep"), "snapshots")), 60,
                   "the tree published again")
        assert [(p.name, p.parent) for p in vm.snapshots] == expected
        assert not stray.exists()
        ok(vm.revert_to_snapshot("s1"))
        ok(vm.delete())


@pytest.mark.slow
def test_a_worker_killed_mid_delete_leaves_the_tree_whole(
        private: tuple[RedisServer, WorkerProcess, Path], tmp_path: Path) -> None:
    redis, worker, _base = private
    root = worker.storage_root
    with VirtualServer(redis.url, host="snaphost", poll_interval=0.5) as server:
        vm = new_vm(server, "crash", size_mb=1024)
        ok(vm.create_snapshot("s1"))
        write(present(root, "crash"), 0xAB, "0", "768M")
        ok(vm.create_snapshot("s2"))
        write(present(root, "crash"), 0xCD, "0", "1M")
        views = {s: export(layer(root, "crash", s), tmp_path / f"{s}.raw") for s in ("s1", "s2")}
        views["present"] = export(present(root, "crash"), tmp_path / "present.raw")
        before = (layer_files(root, "crash"), tree(root, "crash"))
        task = vm.delete_snapshot("s2")
        wait_until(lambda: task.snapshot().percent_completed >= 1 or task.is_complete, 120,
                   "the rebase under way")
        assert not task.is_complete
        worker.kill()
        assert task.wait_for_completion(30_000)
        assert task.result is VMTaskResult.ThreadCrashError
        worker.start()
        wait_until(lambda: vm.state is S.TurnedOff, 60, "the VM reconciled")
        assert (layer_files(root, "crash"), tree(root, "crash")) == before
        assert [p.name for p in vm.snapshots] == ["s1", "s2"]
        for point in ("s1", "s2"):
            assert same(layer(root, "crash", point), views[point])
        assert same(present(root, "crash"), views["present"])
        ok(vm.delete_snapshot("s2"))
        assert same(present(root, "crash"), views["present"])
        ok(vm.delete())


@pytest.mark.slow
def test_a_full_clone_cancelled_mid_copy_leaves_nothing(server: VirtualServer, root: Path,
                                                       name: str) -> None:
    vm = new_vm(server, name, size_mb=1024)
    write(root / name / "disk.qcow2", 0xAB, "0", "768M")
    task = vm.clone(f"{name}-c")
    wait_until(lambda: task.snapshot().percent_completed >= 1 or task.is_complete, 120,
               "the copy under way")
    task.cancel()
    assert task.wait_for_completion(120_000)
    assert task.result is VMTaskResult.Cancelled, task.error_description
    assert server.find_virtual_machine(f"{name}-c") is None
    assert not (root / "vms" / f"{name}-c").exists()
    ok(vm.delete())


@pytest.mark.slow
def test_a_worker_killed_mid_clone_leaves_nothing_after_its_restart(
        private: tuple[RedisServer, WorkerProcess, Path]) -> None:
    redis, worker, _base = private
    root = worker.storage_root
    with VirtualServer(redis.url, host="snaphost", poll_interval=0.5) as server:
        vm = new_vm(server, "big", size_mb=1024)
        write(root / "big" / "disk.qcow2", 0xAB, "0", "768M")
        task = vm.clone("big-c")
        wait_until(lambda: task.snapshot().percent_completed >= 1 or task.is_complete, 120,
                   "the copy under way")
        assert not task.is_complete
        worker.kill()
        assert task.wait_for_completion(30_000)
        assert task.result is VMTaskResult.ThreadCrashError
        assert (root / "vms" / "big-c" / "clone.json").exists()
        worker.start()
        wait_until(lambda: not (root / "vms" / "big-c").exists(), 60, "the clone removed")
        assert server.find_virtual_machine("big-c") is None
        ok(vm.clone("big-c"))  # the name is free again
        reads(root / server.find_virtual_machine("big-c").details["disks"][0],  # type: ignore[union-attr]
              0xAB, "0", "1M")


@pytest.mark.slow
def test_a_revert_to_a_point_with_memory_resumes_the_same_boot(server: VirtualServer,
                                                               root: Path) -> None:
    """The tiny guest's kernel boot id, read through its real agent: a Saved VM's point
    with memory brings back that very boot, after the VM has booted afresh since."""
    add_guest(root)
    name = "sboot"  # short: QEMU's sockets live under the root (108-byte limit)
    ok(server.create_dynamic_virtual_hard_disk(f"{name}/d.qcow2", 16))
    vm = server.create_virtual_machine(
        name, memory_mb=128, disks=[f"{name}/d.qcow2"], guest_agent=True, network=None,
        kernel="guest/vmlinuz", initrd="guest/initrd.gz", append="console=ttyS0 quiet panic=-1")
    try:
        ok(vm.startup())
        wait_for_agent(root, name)
        first = boot_id(root, name)
        ok(vm.save())
        ok(vm.create_snapshot("m"))
        ok(vm.startup())
        wait_for_agent(root, name)
        assert boot_id(root, name) == first
        ok(vm.turn_off())
        ok(vm.startup())
        wait_for_agent(root, name)
        assert boot_id(root, name) != first  # a new boot: the check can fail
        ok(vm.turn_off())
        ok(vm.revert_to_snapshot("m"))
        assert vm.state is S.Saved
        ok(vm.startup())
        wait_for_agent(root, name)
        assert boot_id(root, name) == first
    finally:
        if vm.state in (S.Running, S.Paused, S.Saved):
            ok(vm.turn_off())
    ok(vm.delete())


def test_a_source_and_its_linked_clone_run_side_by_side(server: VirtualServer, root: Path,
                                                        name: str) -> None:
    """Both QEMUs read the shared, read-only layer at once (no image lock conflict)."""
    vm = new_vm(server, name)
    ok(vm.create_snapshot("s1"))
    ok(vm.clone(f"{name}-c", linked=True, snapshot="s1"))
    clone = server.find_virtual_machine(f"{name}-c")
    assert clone is not None
    try:
        ok(vm.startup())
        ok(clone.startup())
        assert (vm.state, clone.state) == (S.Running, S.Running)
    finally:
        for machine in (vm, clone):
            if machine.state is S.Running:
                ok(machine.turn_off())
    ok(clone.delete())
    ok(vm.delete())


@pytest.mark.slow
def test_the_last_delete_is_not_cancelable_once_it_commits(server: VirtualServer, root: Path,
                                                           name: str) -> None:
    """Cancelable until the tree drops the point; then the commit into the base runs,
    and is_cancelable says so at that moment: cancel() is refused, the task succeeds."""
    vm = new_vm(server, name, size_mb=1024)
    ok(vm.create_snapshot("s1"))
    write(present(root, name), 0xAB, "0", "768M")
    task = vm.delete_snapshot("s1")
    assert task.is_cancelable
    wait_until(lambda: not task.snapshot().is_cancelable, 120, "the final switch")
    assert not task.is_complete  # the commit still runs
    with pytest.raises(errors.TaskNotCancelableError):
        task.cancel()
    ok(task)
    assert vm.snapshots == [] and tree(root, name) is None
    reads(root / name / "disk.qcow2", 0xAB, "0", "768M")
    ok(vm.delete())


def test_a_vm_whose_disks_changed_under_its_tree_does_not_start(
        server: VirtualServer, root: Path, name: str) -> None:
    """Past the producer's refusal (its record's copy of the tree lost), the worker
    still will not run the VM on another chain than its present's."""
    vm = new_vm(server, name)
    ok(server.create_dynamic_virtual_hard_disk(f"{name}/other.qcow2", 16))
    ok(vm.create_snapshot("s1"))
    server.redis.hdel(keys.vm_record(name), "snapshots")
    vm.configure(disks=[f"{name}/other.qcow2"])
    task = vm.startup()
    assert task.wait_for_completion(60_000)
    assert task.result is VMTaskResult.IllegalValueError, task.error_description
    assert "differs from the snapshots' base disks" in task.error_description
    assert vm.state is S.TurnedOff
    ok(vm.delete())
