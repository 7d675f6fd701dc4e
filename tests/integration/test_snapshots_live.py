"""Snapshots of a running VM (issue 23, the live half): one booted tiny guest with its
real qemu-ga for the module, a real worker and Redis.  The guest writes patterns onto
its own disk (dd with fsync); what each point and the present read is checked on the
host with ``qemu-io -U read -P`` and ``qemu-img compare``, the boot id through the
agent."""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from api import VirtualMachine, VirtualServer, VMTaskResult, VMVMState, errors
from api.protocol.formats import MiB
from tests.guests import (
    BLOCK,
    add_guest,
    agent,
    boot_id,
    guest_write,
    wait_for_agent,
)
from tests.helpers import assert_succeeded as ok
from tests.pause_points import PAUSING, pause_env
from workers.devtools.sandbox import TEST_TASK_MODULE, RedisServer, WorkerProcess, wait_until
from workers.engines import qemu_vm

S = VMVMState
HOST = "lshost"
NAME = "lsvm"  # short: QEMU's sockets live under the root (108-byte limit)
FAST = {"VMTASK_HEARTBEAT_SECONDS": "1", "VMTASK_LEASE_SECONDS": "3"}


class Rig:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.redis = RedisServer(base / "redis").start()
        self.root = base / "root"
        self.worker = self.new_worker().start()
        self.pausing = False

    def new_worker(self, pause: str = "", marker: Path | None = None) -> WorkerProcess:
        env = dict(FAST)
        include: tuple[str, ...] = (TEST_TASK_MODULE,)
        if pause:
            assert marker is not None
            env.update(pause_env(pause, marker))
            include = PAUSING
        return WorkerProcess(self.redis.url, HOST, self.root, self.base, concurrency=2,
                             env=env, include=include)

    def swap(self, worker: WorkerProcess) -> None:
        """Another worker serves the host (the guest's QEMU outlives the change)."""
        self.worker.stop()
        self.worker = worker.start()

    def holding(self, pause: str, marker: Path) -> None:
        """A worker that holds before QMP ``pause`` (until ``marker`` goes)."""
        self.swap(self.new_worker(pause, marker))
        self.pausing = True

    def normal(self) -> None:
        """A plain worker again, if a test left one that holds (a swap is seconds)."""
        if self.pausing:
            self.swap(self.new_worker())
            self.pausing = False


# One xdist process runs the module in order: its booted guest is built once.
pytestmark = pytest.mark.xdist_group("snapshots-live")


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    rig = Rig(Path(tmp_path_factory.mktemp("ls")))
    yield rig
    rig.worker.stop()
    rig.redis.stop()


@pytest.fixture(scope="module")
def vm(rig: Rig) -> Iterator[VirtualMachine]:
    add_guest(rig.root)
    with VirtualServer(rig.redis.url, host=HOST, poll_interval=0.2) as server:
        ok(server.create_dynamic_virtual_hard_disk(f"{NAME}/d.qcow2", 64))
        machine = server.create_virtual_machine(
            NAME, memory_mb=128, disks=[f"{NAME}/d.qcow2"], guest_agent=True, network=None,
            kernel="guest/vmlinuz", initrd="guest/initrd.gz",
            append="console=ttyS0 quiet panic=-1")
        ok(machine.startup())
        wait_for_agent(rig.root, NAME)
        yield machine
        if machine.state in (S.Running, S.Paused, S.Saved):
            ok(machine.turn_off())
        ok(machine.delete())


def folder(rig: Rig) -> Path:
    return rig.root / "vms" / NAME / "snapshots"


def files(rig: Rig) -> set[str]:
    return {p.name for p in folder(rig).glob("*")} if folder(rig).exists() else set()


def tree(rig: Rig) -> dict[str, object] | None:
    import json

    path = folder(rig) / "tree.json"
    return json.loads(path.read_text()) if path.exists() else None


def layer(rig: Rig, snapshot: str) -> Path:
    data = tree(rig)
    assert data is not None
    point = next(p for p in data["snapshots"] if p["name"] == snapshot)  # type: ignore[attr-defined]
    return folder(rig) / f"{point['layer']}-0.qcow2"


def present(rig: Rig) -> Path:
    data = tree(rig)
    if data is None:
        return rig.root / NAME / "d.qcow2"
    return folder(rig) / f"{data['present']}-0.qcow2"


def reads(image: Path, value: int) -> bool:
    """Whether the image's first block holds ``value`` (read beside the running QEMU)."""
    result = subprocess.run(["qemu-io", "-r", "-U", "-f", "qcow2", "-c",
                             f"read -P {value:#x} 0 {BLOCK}", str(image)],
                            capture_output=True, text=True, timeout=60)
    matched = result.returncode == 0 and "Pattern verification failed" not in result.stdout
    if not matched:
        print(image, result.stdout, result.stderr)
    return matched


def view(image: Path, out: Path) -> Path:
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(out)],
                   check=True)
    return out


def same(image: Path, raw: Path) -> bool:
    result = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw",
                             str(image), str(raw)], capture_output=True, text=True)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 0


def write(rig: Rig, value: int) -> None:
    with agent(rig.root, NAME) as client:
        guest_write(client, value)


def test_a_point_with_memory_resumes_the_same_boot(rig: Rig, vm: VirtualMachine) -> None:
    rig.normal()
    first = boot_id(rig.root, NAME)
    write(rig, 0xA1)
    task = vm.create_snapshot("m", include_memory=True)
    ok(task)
    output = task.snapshot().output
    assert output["include_memory"] is True and output["state"] == int(S.Running)
    assert output["paused_ms"] > 0 and output["is_current"]
    assert vm.state is S.Running
    assert [(p.name, p.include_memory, p.state) for p in vm.snapshots] == [
        ("m", True, S.Running)]
    assert reads(layer(rig, "m"), 0xA1)
    write(rig, 0xB2)  # on the new present, over the frozen layer
    assert reads(present(rig), 0xB2) and reads(layer(rig, "m"), 0xA1)
    ok(vm.revert_to_snapshot("m"))
    assert vm.state is S.Running
    wait_for_agent(rig.root, NAME)
    assert boot_id(rig.root, NAME) == first  # the same boot went on
    assert reads(present(rig), 0xA1)
    ok(vm.delete_snapshot("m"))  # live, the last one: the VM is plain again
    assert vm.snapshots == [] and tree(rig) is None and files(rig) == set()
    assert reads(rig.root / NAME / "d.qcow2", 0xA1)
    assert vm.state is S.Running and boot_id(rig.root, NAME) == first
    # A Paused VM's point with memory comes back Paused.
    ok(vm.pause())
    task = vm.create_snapshot("pm")
    ok(task)
    assert task.snapshot().output["state"] == int(S.Paused) and vm.state is S.Paused
    ok(vm.revert_to_snapshot("pm"))
    assert vm.state is S.Paused
    ok(vm.resume())
    ok(vm.delete_snapshot("pm"))
    assert boot_id(rig.root, NAME) == first and files(rig) == set()


def test_disk_only_points_freeze_and_delete_live(rig: Rig, vm: VirtualMachine,
                                                 tmp_path: Path) -> None:
    rig.normal()
    write(rig, 0xC1)
    task = vm.create_snapshot("d1", include_memory=False)
    ok(task)
    output = task.snapshot().output
    assert (output["include_memory"], output["paused_ms"], output["frozen"]) == (
        False, 0, True)
    with agent(rig.root, NAME) as client:
        assert client.execute("guest-fsfreeze-status") == "thawed"
    write(rig, 0xC2)
    ok(vm.create_snapshot("d2", include_memory=False))
    write(rig, 0xC3)
    views = {s: view(layer(rig, s), tmp_path / f"{s}.raw") for s in ("d1", "d2")}
    assert reads(layer(rig, "d1"), 0xC1) and reads(layer(rig, "d2"), 0xC2)
    now = view(present(rig), tmp_path / "now.raw")
    # d1 sits under d2 in QEMU's chain: d2's layer takes it in by a stream.
    task = vm.delete_snapshot("d1")
    ok(task)
    assert [(p.name, p.parent) for p in vm.snapshots] == [("d2", None)]
    assert same(layer(rig, "d2"), views["d2"]) and same(present(rig), now)
    assert vm.state is S.Running
    # The last one: streamed into the present, which is committed into the base.
    ok(vm.delete_snapshot("d2"))
    assert vm.snapshots == [] and tree(rig) is None and files(rig) == set()
    assert same(rig.root / NAME / "d.qcow2", now)
    with qemu_vm.connect(qemu_vm.VMPaths.for_vm(rig.root, NAME)) as monitor:
        nodes = [n["node-name"] for n in monitor.execute("query-named-block-nodes")]
    assert not [n for n in nodes if n.startswith("vmtask-")]  # QEMU let go of them
    write(rig, 0xC4)  # the guest writes on, now on its base
    assert reads(rig.root / NAME / "d.qcow2", 0xC4)


def guest_disk_bytes(rig: Rig) -> int:
    with agent(rig.root, NAME) as client:
        handle = client.execute("guest-file-open", {"path": "/sys/block/vda/size"})
        read = client.execute("guest-file-read", {"handle": handle})
        client.execute("guest-file-close", {"handle": handle})
    return int(base64.b64decode(read["buf-b64"])) * 512


def test_a_running_vms_disk_grows_live(rig: Rig, vm: VirtualMachine) -> None:
    rig.normal()
    with VirtualServer(rig.redis.url, host=HOST, poll_interval=0.2) as server:
        disk = server.get_hard_disk(f"{NAME}/d.qcow2")
        assert guest_disk_bytes(rig) == 64 * MiB
        task = disk.resize(96)
        ok(task)
        assert task.snapshot().output["chain"][0]["size_in_guest"] == 96 * MiB
        wait_until(lambda: guest_disk_bytes(rig) == 96 * MiB, 30, "the guest seeing 96 MB")
        assert vm.state is S.Running
        # Beside snapshots a disk does not grow: refused before anything is queued.
        ok(vm.create_snapshot("r", include_memory=False))
        with pytest.raises(errors.InvalidStateError, match="snapshots"):
            server.get_hard_disk(f"{NAME}/d.qcow2").resize(128)
        ok(vm.delete_snapshot("r"))
        assert guest_disk_bytes(rig) == 96 * MiB


def test_clones_of_a_running_source(rig: Rig, vm: VirtualMachine, tmp_path: Path) -> None:
    """A full clone of the present copied by the running QEMU (the guest not
    stopped), and a linked clone of a snapshot's read-only layer."""
    rig.normal()
    write(rig, 0x71)
    ok(vm.create_snapshot("c", include_memory=False))
    write(rig, 0x72)
    now = view(present(rig), tmp_path / "now.raw")
    with VirtualServer(rig.redis.url, host=HOST, poll_interval=0.2) as server:
        ok(vm.clone("lsfull"))
        ok(vm.clone("lslink", linked=True, snapshot="c"))
        assert vm.state is S.Running
        full, link = (server.find_virtual_machine(n) for n in ("lsfull", "lslink"))
        assert full is not None and link is not None
        assert full.state is S.TurnedOff and full.details["mac"] != vm.details["mac"]
        assert same(rig.root / full.details["disks"][0], now)
        assert reads(rig.root / link.details["disks"][0], 0x71)
        ok(link.delete())
        ok(full.delete())
    ok(vm.delete_snapshot("c"))
    assert files(rig) == set()


@pytest.mark.slow
def test_a_cancel_mid_snapshot_leaves_no_trace(rig: Rig, vm: VirtualMachine) -> None:
    """Held before its migrate, the snapshot is cancelled: no point, no file, and the
    guest runs on its old top."""
    marker = rig.base / "cancel.marker"
    rig.holding("migrate", marker)
    write(rig, 0xD1)
    before = files(rig)
    task = vm.create_snapshot("x", include_memory=True)
    wait_until(marker.exists, 60, "the snapshot held before its migrate")
    task.cancel()
    marker.unlink()
    assert task.wait_for_completion(60_000)
    assert task.result is VMTaskResult.Cancelled, task.error_description
    assert vm.snapshots == [] and files(rig) == before
    assert vm.state is S.Running
    write(rig, 0xD2)
    assert reads(present(rig), 0xD2)


@pytest.mark.slow
def test_a_live_delete_cancelled_mid_stream_changes_nothing(rig: Rig, vm: VirtualMachine,
                                                            tmp_path: Path) -> None:
    """Held before its block-stream, the delete is cancelled: the job is cancelled
    and every view reads as before; then it is sealed before its commit (the final
    switch), where cancel() is refused."""
    marker = rig.base / "stream.marker"
    rig.holding("block-stream", marker)  # a create calls no block-stream
    write(rig, 0xF1)
    ok(vm.create_snapshot("p", include_memory=False))
    write(rig, 0xF2)
    before, point = files(rig), view(layer(rig, "p"), tmp_path / "p.raw")
    now = view(present(rig), tmp_path / "now.raw")
    task = vm.delete_snapshot("p")
    wait_until(marker.exists, 60, "the delete held before its stream")
    task.cancel()
    marker.unlink()
    assert task.wait_for_completion(60_000)
    assert task.result is VMTaskResult.Cancelled, task.error_description
    assert [p.name for p in vm.snapshots] == ["p"] and files(rig) == before
    assert same(layer(rig, "p"), point) and same(present(rig), now)
    assert vm.state is S.Running
    rig.holding("block-commit", marker)
    task = vm.delete_snapshot("p")
    wait_until(marker.exists, 60, "the delete held before its commit")
    assert not task.snapshot().is_cancelable
    with pytest.raises(errors.TaskNotCancelableError):
        task.cancel()
    marker.unlink()
    ok(task)
    assert vm.snapshots == [] and files(rig) == set()
    assert same(rig.root / NAME / "d.qcow2", now)


@pytest.mark.slow
def test_a_worker_killed_mid_snapshot_leaves_the_vm_usable(rig: Rig, vm: VirtualMachine,
                                                           tmp_path: Path) -> None:
    """Killed with the guest stopped and its RAM written, just before the switch: the
    task ends ThreadCrashError, and the next start removes the files, lists nothing
    and lets the same boot run on."""
    marker = rig.base / "kill.marker"
    first = boot_id(rig.root, NAME)
    rig.holding("transaction", marker)
    before = files(rig)
    task = vm.create_snapshot("k", include_memory=True)
    wait_until(marker.exists, 60, "the snapshot held before its switch")
    rig.worker.kill()
    assert task.wait_for_completion(30_000)
    assert task.result is VMTaskResult.ThreadCrashError
    marker.unlink()
    rig.worker, rig.pausing = rig.new_worker().start(), False
    wait_until(lambda: files(rig) == before, 60, "the unfinished snapshot removed")
    assert vm.snapshots == []
    wait_until(lambda: vm.state is S.Running, 60, "the VM running")
    wait_for_agent(rig.root, NAME)
    assert boot_id(rig.root, NAME) == first
    write(rig, 0xE1)
    assert reads(present(rig), 0xE1)
    ok(vm.create_snapshot("k", include_memory=False))  # and it snapshots again
    # Killed again, in the live delete of that last point, its commit ready to pivot
    # (past the seal): the point is gone, the VM reads the same on its present, and
    # it snapshots and deletes again (the dead worker's job settled).
    write(rig, 0xE2)
    now = view(present(rig), tmp_path / "now.raw")
    rig.holding("job-complete", marker)
    task = vm.delete_snapshot("k")
    wait_until(marker.exists, 60, "the delete held before its pivot")
    rig.worker.kill()
    assert task.wait_for_completion(30_000)
    assert task.result is VMTaskResult.ThreadCrashError
    marker.unlink()
    rig.worker, rig.pausing = rig.new_worker().start(), False
    assert vm.snapshots == [] and vm.state is S.Running
    assert same(present(rig), now)
    ok(vm.create_snapshot("k2", include_memory=False))
    ok(vm.delete_snapshot("k2"))
    assert vm.snapshots == [] and files(rig) == set()
    assert same(rig.root / NAME / "d.qcow2", now)
