"""Backups of a running VM (issue 24): the tiny guest keeps running while QEMU's backup
job reads a point-in-time view, the persistent bitmap survives a VM restart (the next
backup is incremental), and a worker killed with -9 mid-backup lists nothing and
leaves the next backup correct.  One guest per module; the guest writes through its
agent with an fsync, and the restore points are read with qemu-io and compared with
``qemu-img compare`` once the VM is off."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from api import VirtualMachine, VirtualServer, VMTaskResult, VMVMState
from api.protocol.backups import listing_key
from tests.guests import add_guest, agent, guest_write, wait_for_agent
from tests.helpers import assert_succeeded as ok
from tests.helpers import bitmaps, qemu_io, same
from workers.devtools.sandbox import RedisServer, WorkerProcess, wait_until

# One xdist process runs the module in order: its booted guest is built once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("backups-live")]
S = VMVMState
CLUSTER = 65536
# Backups read at 32 MiB/s per disk: slow enough to cancel or kill one mid-copy.
FAST = {"VMTASK_HEARTBEAT_SECONDS": "1", "VMTASK_LEASE_SECONDS": "3",
        "VMTASK_BACKUP_MAX_BANDWIDTH": str(32 << 20)}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(tmp_path_factory.mktemp("bk"))  # short: QEMU's sockets live under it


@pytest.fixture(scope="module")
def redis_url(base: Path) -> Iterator[str]:
    redis = RedisServer(base / "redis").start()
    yield redis.url
    redis.stop()


@pytest.fixture(scope="module")
def worker(redis_url: str, base: Path) -> Iterator[WorkerProcess]:
    process = WorkerProcess(redis_url, "bk", base / "r", base, concurrency=2, env=FAST).start()
    add_guest(process.storage_root)
    yield process
    process.stop()


@pytest.fixture
def server(redis_url: str, worker: WorkerProcess) -> Iterator[VirtualServer]:
    with VirtualServer(redis_url, host="bk", poll_interval=0.2) as vs:
        yield vs


def boot(server: VirtualServer, root: Path, name: str, size_mb: int = 64,
         data: str = "8M") -> VirtualMachine:
    vm = server.find_virtual_machine(name)
    if vm is None:
        ok(server.create_dynamic_virtual_hard_disk(f"{name}/d.qcow2", size_mb))
        qemu_io(root / name / "d.qcow2", "qcow2", f"write -P 0x5a 1M {data}")
        vm = server.create_virtual_machine(
            name, memory_mb=128, disks=[f"{name}/d.qcow2"], guest_agent=True, network=None,
            kernel="guest/vmlinuz", initrd="guest/initrd.gz",
            append="console=ttyS0 quiet panic=-1")
    ok(vm.startup())
    wait_for_agent(root, name)
    return vm


def backup_of(vm: VirtualMachine, repository: str) -> dict[str, object]:
    task = vm.backup(repository)
    ok(task)
    output: dict[str, object] = task.snapshot().output
    return output


def scratch_vm(root: Path) -> tuple[Path, int]:
    """A scratch VM of a verify under way: its journal and a live (paused) QEMU."""
    folder = root / "vms" / "verify-0badf00d"
    folder.mkdir(parents=True)
    (folder / "clone.json").write_text('{"task": "t", "source": "verify b"}')
    subprocess.run(["qemu-system-x86_64", "-S", "-display", "none", "-nodefaults",
                    "-daemonize", "-pidfile", str(folder / "qemu.pid"),
                    "-qmp", f"unix:{folder / 'qmp.sock'},server=on,wait=off"], check=True)
    return folder, int((folder / "qemu.pid").read_text())


def first_block(image: Path, value: int) -> None:
    qemu_io(image, "qcow2", f"read -P {value:#x} 0 4096")


def test_running_vm_incremental_across_a_restart_a_save_and_a_crash(server: VirtualServer,
                                                 worker: WorkerProcess) -> None:
    root, name, repository = worker.storage_root, "live1", "repo1"
    disk = root / name / "d.qcow2"
    vm = boot(server, root, name)
    with agent(root, name) as client:
        guest_write(client, 0xA1)
    first = backup_of(vm, repository)
    assert first["kind"] == "full" and vm.state is S.Running
    with agent(root, name) as client:
        guest_write(client, 0xB2)  # the guest runs on after the backup
    ok(vm.pause())  # a Paused VM: its QEMU runs the job all the same
    second = backup_of(vm, repository)
    assert (second["kind"], second["parent"]) == ("incremental", first["id"])
    assert vm.state is S.Paused
    ok(vm.resume())
    assert CLUSTER <= int(str(second["bytes_read"])) <= 4 * CLUSTER

    ok(vm.turn_off())  # QEMU quits cleanly: the bitmap is written into the qcow2
    marks = bitmaps(disk)
    assert len(marks) == 1 and "in-use" not in next(iter(marks.values()))
    assert next(iter(marks)).endswith(str(second["id"]))
    vm = boot(server, root, name)
    with agent(root, name) as client:
        guest_write(client, 0xC3)
    third = backup_of(vm, repository)
    assert (third["kind"], third["parent"]) == ("incremental", second["id"]), third["reason"]
    ok(vm.save())  # a Saved VM: the storage daemon opens its disks
    saved = backup_of(vm, repository)
    assert (saved["kind"], saved["parent"]) == ("incremental", third["id"]), saved["reason"]
    assert int(str(saved["bytes_read"])) <= 4 * CLUSTER
    ok(vm.startup())  # restored from its saved state, which the backup left loadable
    wait_for_agent(root, name)
    # QEMU killed: the bitmap it loaded at the start stays marked in use in the qcow2.
    os.kill(int((root / "vms" / name / "qemu.pid").read_text()), signal.SIGKILL)
    wait_until(lambda: vm.state is not S.Running, 30, "the watch noticing the crash")
    if vm.state is S.Invalid:
        ok(vm.turn_off())
    assert bitmaps(disk) == {
        f"vmtask-backup-{index_id(root, repository)[:12]}-{saved['id']}": ["in-use", "auto"]}

    folder = root / repository
    first_block(folder / str(first["id"]) / "disk-0.qcow2", 0xA1)
    first_block(folder / str(second["id"]) / "disk-0.qcow2", 0xB2)
    raw = root / "live1.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], check=True)
    assert same(folder / str(saved["id"]) / "disk-0.qcow2", raw)
    first_block(folder / str(third["id"]) / "disk-0.qcow2", 0xC3)
    raw.unlink()

    crashed = backup_of(vm, repository)
    assert crashed["kind"] == "full" and "inconsistent" in str(crashed["reason"]), crashed
    qemu_io(disk, "qcow2", "write -P 0x99 0 64k")
    then = backup_of(vm, repository)  # the inconsistent bitmap went; the new one holds
    assert (then["kind"], then["parent"], then["bytes_read"]) == (
        "incremental", crashed["id"], CLUSTER)
    assert list(bitmaps(disk).values()) == [["auto"]]

    verify = server.verify_backup(repository, str(third["id"]))
    ok(verify)
    output = verify.snapshot().output
    assert (output["guest_agent"], output["vm"]) == (True, name)
    assert base64.b64decode(output["screenshot_png_base64"]).startswith(b"\x89PNG")
    assert [p.name for p in (root / "vms").iterdir() if p.name.startswith("verify-")] == []


def test_worker_killed_mid_backup_lists_nothing_and_next_is_correct(
        server: VirtualServer, worker: WorkerProcess, redis_url: str) -> None:
    root, name, repository = worker.storage_root, "live2", "repo2"
    disk = root / name / "d.qcow2"
    vm = boot(server, root, name, 128, data="48M")
    early = backup_of(vm, repository)
    # A running VM: the worker dies, the backup job runs on in the VM's QEMU.
    task = vm.backup(repository, full=True)
    wait_until(lambda: task.percent_completed > 2 or task.snapshot().result is not None, 60,
               "the backup under way")
    assert task.snapshot().result is None, task.snapshot().error_description
    worker.kill()
    worker.start()
    task.wait_for_completion(60_000)
    assert task.snapshot().result is VMTaskResult.ThreadCrashError
    assert vm.state is S.Running  # QEMU is not the worker's child
    # The next backup clears the stale job and its bitmap; the chain goes on.
    first = backup_of(vm, repository)
    assert (first["kind"], first["parent"]) == ("incremental", early["id"]), first["reason"]
    assert int(str(first["bytes_read"])) <= 4 * CLUSTER
    assert [b.id for b in server.backups(repository)] == [early["id"], first["id"]]
    ok(vm.turn_off())
    assert len(bitmaps(disk)) == 1
    # Offline, through the storage daemon: much data to copy, then kill -9 mid-way.
    qemu_io(disk, "qcow2", "write -P 0x77 16M 96M")
    index_before = (root / repository / "index.json").read_text()
    task = vm.backup(repository)
    wait_until(lambda: task.percent_completed > 2 or task.snapshot().result is not None, 60,
               "the backup under way")
    assert task.snapshot().result is None, task.snapshot().error_description
    scratch = scratch_vm(root)  # as a verify killed with its worker leaves it
    worker.kill()  # kill -9 of the worker's whole process group
    assert list((root / repository).glob(".*.partial"))
    with redis.Redis.from_url(redis_url) as client:
        client.delete(listing_key("bk"))  # as a Redis that lost its last writes
    worker.start()
    # The start removes the partial backup and writes the listing again from the folder.
    assert not list((root / repository).glob(".*.partial"))
    task.wait_for_completion(60_000)
    assert task.snapshot().result is VMTaskResult.ThreadCrashError
    assert (root / repository / "index.json").read_text() == index_before
    assert [b.id for b in server.backups(repository)] == [early["id"], first["id"]]
    wait_until(lambda: not scratch[0].exists() and not Path(f"/proc/{scratch[1]}").exists(),
               30, "the scratch VM stopped and removed")
    marks = bitmaps(disk)  # the daemon quit on TERM: the parent's bitmap is whole
    assert all("in-use" not in flags for flags in marks.values()), marks
    after = backup_of(vm, repository)
    assert (after["kind"], after["parent"]) == ("incremental", first["id"]), after["reason"]
    assert json.loads((root / repository / "index.json").read_text())["backups"][-1][
        "id"] == after["id"]
    raw = root / "live2.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], check=True)
    assert same(root / repository / str(after["id"]) / "disk-0.qcow2", raw)
    raw.unlink()


def test_cancelled_backup_leaves_the_repository_and_next_is_incremental(
        server: VirtualServer, worker: WorkerProcess) -> None:
    root, name, repository = worker.storage_root, "live3", "repo3"
    ok(server.create_dynamic_virtual_hard_disk(f"{name}/d.qcow2", 128))
    disk = root / name / "d.qcow2"
    vm = server.create_virtual_machine(name, memory_mb=64, disks=[f"{name}/d.qcow2"],
                                       network=None)
    qemu_io(disk, "qcow2", "write -P 0x11 0 1M")
    first = backup_of(vm, repository)
    before = (root / repository / "index.json").read_text()
    marks = bitmaps(disk)
    qemu_io(disk, "qcow2", "write -P 0x22 0 96M")
    task = vm.backup(repository)
    wait_until(lambda: task.percent_completed > 2 or task.snapshot().result is not None, 60,
               "the backup under way")
    # A start meanwhile is serialised behind the backup (the VM's lock), not refused.
    start = vm.startup()
    wait_until(lambda: start.snapshot().started is not None, 30, "the start under way")
    assert vm.state is S.TurnedOff and task.snapshot().result is None
    task.cancel()
    task.wait_for_completion(60_000)
    assert task.snapshot().result is VMTaskResult.Cancelled
    ok(start)  # it ran once the backup let go
    ok(vm.turn_off())
    assert (root / repository / "index.json").read_text() == before
    assert bitmaps(disk) == marks  # the parent's bitmap, whole and consistent
    assert sorted(p.name for p in (root / repository).iterdir()
                  if not p.name.startswith(".")) == [str(first["id"]), "index.json"]
    after = backup_of(vm, repository)
    assert (after["kind"], after["parent"]) == ("incremental", first["id"]), after["reason"]
    raw = root / "live3.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], check=True)
    assert same(root / repository / str(after["id"]) / "disk-0.qcow2", raw)
    raw.unlink()


def index_id(root: Path, repository: str) -> str:
    return str(json.loads((root / repository / "index.json").read_text())["id"])
