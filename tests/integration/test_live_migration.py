"""Live migration of the tiny guest (TCG) from host alpha to host beta: two real
workers with separate storage roots, QEMU's NBD and migration channels between them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from api import VirtualMachine, VirtualServer, VMTaskResult, VMVMState, errors
from api.protocol import hresults, keys
from api.scripts import Scripts
from tests.cli_runs import run_cli
from tests.guests import (
    BLOCK,
    FAST,
    add_guest,
    agent,
    boot_id,
    guest_write,
    nothing_of,
    running_guest,
    stop_all,
    wait_for_agent,
    where,
)
from tests.helpers import assert_succeeded as done
from tests.helpers import backing_chain, data_in_top, digest, pids_of, qemu_io
from workers.devtools.sandbox import RedisServer, WorkerProcess, wait_until
from workers.devtools.tinyguest import build_tiny_guest
from workers.engines import qemu_vm
from workers.engines.context import NullContext
from workers.engines.guest_agent import qemu_guest_agent_args
from workers.engines.qemu_vm import Monitor, livemigrate
from workers.failures import OperationFailed

pytestmark = pytest.mark.slow
S = VMVMState
# A source that mirrors and migrates at 8 MiB/s: slow enough to act mid-transfer.
SLOW = {**FAST, "VMTASK_MIGRATE_MAX_BANDWIDTH": str(8 << 20)}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Short paths: QEMU's unix sockets live under the storage roots (108-byte limit).
    return Path(tmp_path_factory.mktemp("lm"))


@pytest.fixture(scope="module")
def redis_url(base: Path) -> Iterator[str]:
    redis = RedisServer(base / "redis").start()
    yield redis.url
    redis.stop()


@pytest.fixture(scope="module")
def hosts(redis_url: str, base: Path) -> Iterator[dict[str, WorkerProcess]]:
    started = {name: WorkerProcess(redis_url, name, base / name[0], base, concurrency=2,
                                   env=SLOW if name == "slow" else FAST).start()
               for name in ("alpha", "beta", "slow")}
    for worker in started.values():
        add_guest(worker.storage_root)
    yield started
    stop_all(*started.values())


@pytest.fixture
def server(redis_url: str, hosts: dict[str, WorkerProcess]) -> Iterator[VirtualServer]:
    with VirtualServer(redis_url, host="alpha", poll_interval=0.2) as vs:
        yield vs


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    return "lm" + str(abs(hash(request.node.name)) % 10**6)


def follow(task: Any, vm: VirtualMachine, until: Callable[[float], bool] | None = None
           ) -> tuple[list[float], set[S]]:
    """Sample the task's progress and the VM's state until the task ends (or ``until``)."""
    percents: list[float] = []
    states: set[S] = set()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        snap = task.snapshot()
        percents.append(snap.percent_completed)
        states.add(vm.state)
        if snap.is_complete or (until is not None and until(snap.percent_completed)):
            return percents, states
        time.sleep(0.02)
    raise AssertionError("the migration did not end in time")


def test_a_running_guest_moves_live(server: VirtualServer, hosts: dict[str, WorkerProcess],
                                    name: str, tmp_path: Path) -> None:
    alpha, beta = hosts["alpha"], hosts["beta"]
    vm = running_guest(server, hosts, name, "alpha")
    before = boot_id(alpha.storage_root, name)
    pristine = tmp_path / "pristine.qcow2"
    shutil.copy(alpha.storage_root / name / "d.qcow2", pristine)  # the guest has not written

    # The guest keeps writing its disk through the whole migration.
    acked: list[tuple[int, float]] = []
    stop = threading.Event()

    def writer() -> None:
        value = 1
        with agent(alpha.storage_root, name) as client:
            while not stop.is_set() and value < 250:
                try:
                    guest_write(client, value)
                except OperationFailed:
                    return  # the source QEMU is gone: the guest lives on beta now
                acked.append((value, time.monotonic()))
                value += 1

    thread = threading.Thread(target=writer)
    thread.start()
    wait_until(lambda: len(acked) >= 2, 30, "the guest's first writes")
    submitted = time.monotonic()
    task = vm.migrate("beta")
    assert task.host == "alpha" and task.is_cancelable
    percents, states = follow(task, vm)
    finished = time.monotonic()
    stop.set()
    thread.join(30)
    done(task)
    output = task.snapshot().output
    print(f"\nlive migration: downtime {output['downtime_ms']} ms, guest paused "
          f"{output['paused_ms']} ms, "
          f"QEMU total {output['total_time_ms']} ms, task {finished - submitted:.2f} s")

    assert states == {S.Running}  # read Running throughout
    assert percents == sorted(percents) and percents[-1] == 100
    assert where(vm) == ("beta", S.Running)
    assert server.redis.hget(keys.vm_record(name), "host") == "beta"
    assert any(submitted < at < finished for _, at in acked), "no write during the migration"
    # The same boot, answering through beta.
    assert boot_id(beta.storage_root, name) == before
    assert nothing_of(alpha, name) == []
    assert not server.redis.keys(keys.transfer("*"))
    assert vm.details["pid"] and int(vm.details["pid"]) in pids_of(f"{beta.storage_root}/vms/")

    done(vm.turn_off())  # on beta
    last = acked[-1][0]
    disk = beta.storage_root / name / "d.qcow2"
    first = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -v 0 1", str(disk)],
                           capture_output=True, text=True, check=True).stdout
    value = int(first.split(":")[1].split()[0], 16)
    # The last acknowledged write, or the one in flight at the switch-over.
    assert value in (last, last + 1), (value, last)
    qemu_io(pristine, "qcow2", f"write -P {value} 0 {BLOCK}")
    compared = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2",
                               str(pristine), str(disk)], capture_output=True, text=True)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    done(vm.delete())


def test_a_paused_guest_moves_paused_and_comes_back(server: VirtualServer,
                                                    hosts: dict[str, WorkerProcess],
                                                    name: str) -> None:
    vm = running_guest(server, hosts, name, "alpha", disk_mb=16, data_mb=1)
    before = boot_id(hosts["alpha"].storage_root, name)
    done(vm.pause())
    done(vm.migrate("beta"))
    assert where(vm) == ("beta", S.Paused)
    done(vm.resume())
    assert boot_id(hosts["beta"].storage_root, name) == before
    assert nothing_of(hosts["alpha"], name) == []
    # Back again: the QEMU that received the guest can send it on (it reopens its
    # images by name at the switch-over, so they must keep the names it opened).
    # (through the CLI, which picks live for a running VM just as the library does)
    moved = run_cli("--url", server.url, "--json", "vm", "migrate", name, "alpha")
    assert moved.code == 0, moved.err
    assert moved.json()["result"] == "Success"
    assert where(vm) == ("alpha", S.Running)
    assert boot_id(hosts["alpha"].storage_root, name) == before
    assert nothing_of(hosts["beta"], name) == []
    done(vm.turn_off())
    qemu_io(hosts["alpha"].storage_root / name / "d.qcow2", "qcow2", "read -P 0x5a 1M 1M")
    done(vm.delete())


def test_an_undoable_guest_on_a_differencing_disk_moves_live_as_its_chain(
        server: VirtualServer, hosts: dict[str, WorkerProcess], name: str,
        tmp_path: Path) -> None:
    """Undo overlay over a differencing disk over its parent: the destination gets the
    parent and the child byte for byte and an overlay holding only the top's data, the
    same chain with the same (relative) backing names; the undo disks then merge and
    discard on the destination."""
    a, b = hosts["alpha"].storage_root, hosts["beta"].storage_root
    parent, child = f"{name}/p.qcow2", f"{name}/c.qcow2"
    overlay = f"vms/{name}/undo/0-c.qcow2"
    done(server.create_dynamic_virtual_hard_disk(parent, 64, host="alpha"))
    qemu_io(a / parent, "qcow2", "write -P 0x5a 1M 8M")
    done(server.create_differencing_virtual_hard_disk(child, parent, host="alpha"))
    qemu_io(a / child, "qcow2", "write -P 0x6b 2M 1M")
    vm = server.create_virtual_machine(
        name, memory_mb=128, disks=[child], undoable=True, guest_agent=True, network=None,
        host="alpha", kernel="guest/vmlinuz", initrd="guest/initrd.gz",
        append="console=ttyS0 quiet panic=-1")
    done(vm.startup())
    wait_for_agent(a, name)
    before = boot_id(a, name)
    with agent(a, name) as client:
        guest_write(client, 0x3c)  # into the undo overlay, synced
    below = {path: digest(a / path) for path in (parent, child)}
    chain = backing_chain(a / overlay)
    assert [n for n, _ in chain] == ["0-c.qcow2", "c.qcow2", "p.qcow2"], chain
    view = tmp_path / "view.raw"  # the guest's disk as the source sees it
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(a / overlay), str(view)],
                   check=True)

    submitted = time.monotonic()
    task = vm.migrate("beta")
    percents, states = follow(task, vm)
    done(task)
    output = task.snapshot().output
    print(f"\nlive migration of a 3-image chain: task {time.monotonic() - submitted:.2f} s, "
          f"downtime {output['downtime_ms']} ms, guest paused {output['paused_ms']} ms")
    assert states == {S.Running} and percents == sorted(percents) and percents[-1] == 100
    assert where(vm) == ("beta", S.Running)
    assert boot_id(b, name) == before
    # The parent stays on alpha (other disks may share it), as in a cold move.
    assert nothing_of(hosts["alpha"], name) == [parent]
    assert not (a / "vms" / name).exists()
    done(vm.turn_off())  # on beta

    assert backing_chain(b / overlay) == chain  # the same chain, relative names included
    assert {path: digest(b / path) for path in below} == below  # byte for byte
    assert data_in_top(b / overlay) < 1 << 20  # only the top was mirrored, not flattened
    qemu_io(b / overlay, "qcow2", f"read -P 0x3c 0 {BLOCK}", "read -P 0x6b 2M 1M",
            "read -P 0x5a 3M 6M")
    compared = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(view),
                               str(b / overlay)], capture_output=True, text=True)
    assert compared.returncode == 0, compared.stdout + compared.stderr

    done(vm.discard_undo_disks())  # on beta: the migrated overlay goes, the child stays
    assert not (b / overlay).exists() and digest(b / child) == below[child]
    done(vm.startup())  # a fresh overlay over the child
    wait_for_agent(b, name)
    with agent(b, name) as client:
        guest_write(client, 0x4d)
    done(vm.turn_off())
    done(vm.merge_undo_disks())  # into the child, on beta
    assert not (b / overlay).exists()
    qemu_io(b / child, "qcow2", f"read -P 0x4d 0 {BLOCK}", "read -P 0x6b 2M 1M")
    assert digest(b / parent) == below[parent]
    done(vm.delete())


def test_a_differencing_disk_moves_live_over_a_copy_of_its_parent(
        server: VirtualServer, hosts: dict[str, WorkerProcess], name: str) -> None:
    """Not flattened: the parent arrives byte for byte and the child over it holds only
    the child's data.  The parent stays on the source (other disks may share it), so
    the VM cannot come back live while it is there: a clash, refused before anything
    moves."""
    a, b = hosts["alpha"].storage_root, hosts["beta"].storage_root
    parent, child = f"{name}/p.qcow2", f"{name}/c.qcow2"
    done(server.create_dynamic_virtual_hard_disk(parent, 64, host="alpha"))
    qemu_io(a / parent, "qcow2", "write -P 0x5a 1M 8M")
    done(server.create_differencing_virtual_hard_disk(child, parent, host="alpha"))
    vm = server.create_virtual_machine(
        name, memory_mb=128, disks=[child], guest_agent=True, network=None, host="alpha",
        kernel="guest/vmlinuz", initrd="guest/initrd.gz", append="console=ttyS0 quiet panic=-1")
    done(vm.startup())
    wait_for_agent(a, name)
    before = boot_id(a, name)
    with agent(a, name) as client:
        guest_write(client, 0x3c)  # into the child
    pristine = digest(a / parent)
    chain = backing_chain(a / child)
    done(vm.migrate("beta"))
    assert where(vm) == ("beta", S.Running) and boot_id(b, name) == before
    assert nothing_of(hosts["alpha"], name) == [parent]
    task = vm.migrate("alpha")
    assert task.wait_for_completion(60_000)
    assert (task.result, task.error) == (VMTaskResult.DiskRelatedError, hresults.FILE_EXISTS)
    assert where(vm) == ("beta", S.Running) and boot_id(b, name) == before
    done(vm.turn_off())
    assert backing_chain(b / child) == chain
    assert digest(b / parent) == pristine
    assert data_in_top(b / child) < 1 << 20
    qemu_io(b / child, "qcow2", f"read -P 0x3c 0 {BLOCK}", "read -P 0x5a 1M 8M")
    done(vm.delete())


def test_cancel_mid_transfer_leaves_it_running_on_the_source(
        server: VirtualServer, hosts: dict[str, WorkerProcess], name: str) -> None:
    slow, beta = hosts["slow"], hosts["beta"]
    vm = running_guest(server, hosts, name, "slow", disk_mb=256, data_mb=96)
    before = boot_id(slow.storage_root, name)
    task = vm.migrate("beta")
    percents, states = follow(task, vm, until=lambda percent: percent >= 10)
    assert not task.is_complete and 10 <= percents[-1] < 90  # the disk is on its way
    task.cancel()
    assert task.wait_for_completion(60_000)
    assert task.result is VMTaskResult.Cancelled
    assert states == {S.Running}
    assert where(vm) == ("slow", S.Running)
    assert boot_id(slow.storage_root, name) == before  # unharmed, never restarted
    wait_until(lambda: nothing_of(beta, name) == [], 30, "beta to drop the migration")
    done(vm.turn_off())
    qemu_io(slow.storage_root / name / "d.qcow2", "qcow2", "read -P 0x5a 1M 96M")
    done(vm.delete())


def test_an_incompatible_destination_is_refused_before_anything_moves(
        server: VirtualServer, hosts: dict[str, WorkerProcess], name: str) -> None:
    alpha, beta = hosts["alpha"], hosts["beta"]
    vm = running_guest(server, hosts, name, "alpha", disk_mb=16, data_mb=1)
    before = boot_id(alpha.storage_root, name)
    clash = beta.storage_root / name / "d.qcow2"
    clash.parent.mkdir(parents=True, exist_ok=True)
    clash.write_bytes(b"mine")
    task = vm.migrate("beta")
    assert task.wait_for_completion(60_000)
    assert (task.result, task.error) == (VMTaskResult.DiskRelatedError, hresults.FILE_EXISTS)
    assert clash.read_bytes() == b"mine"
    clash.unlink()
    assert nothing_of(beta, name) == []  # no QEMU was started there
    assert where(vm) == ("alpha", S.Running)
    assert boot_id(alpha.storage_root, name) == before

    # A kernel the destination lacks: refused, the guest runs on.
    (beta.storage_root / "guest" / "initrd.gz").rename(beta.storage_root / "guest" / "x")
    try:
        task = vm.migrate("beta")
        assert task.wait_for_completion(60_000)
        assert (task.result, task.error) == (VMTaskResult.DiskRelatedError,
                                             hresults.FILE_NOT_FOUND)
    finally:
        (beta.storage_root / "guest" / "x").rename(beta.storage_root / "guest" / "initrd.gz")
    assert nothing_of(beta, name) == []
    assert where(vm) == ("alpha", S.Running)
    with pytest.raises(errors.InvalidArgumentError):
        vm.migrate("alpha")
    done(vm.turn_off())
    done(vm.delete())


def test_a_vhd_disk_is_refused_for_live_migration(server: VirtualServer,
                                                  hosts: dict[str, WorkerProcess],
                                                  name: str) -> None:
    done(server.create_dynamic_virtual_hard_disk(f"{name}/d.vhd", 16))
    vm = server.create_virtual_machine(
        name, memory_mb=64, disks=[f"{name}/d.vhd"], network=None, host="alpha",
        kernel="guest/vmlinuz", initrd="guest/initrd.gz", append="console=ttyS0 quiet")
    done(vm.startup())
    task = vm.migrate("beta")
    assert task.wait_for_completion(60_000)
    assert task.result is VMTaskResult.IllegalValueError, task.error_description
    assert where(vm) == ("alpha", S.Running)
    assert nothing_of(hosts["beta"], name) == []
    done(vm.turn_off())
    done(vm.delete())


def test_kill_9_of_the_destination_worker_leaves_the_guest_on_the_source(
        server: VirtualServer, hosts: dict[str, WorkerProcess], redis_url: str, base: Path,
        name: str) -> None:
    slow = hosts["slow"]
    delta = WorkerProcess(redis_url, "delta", base / "d", base, concurrency=2, env=FAST).start()
    try:
        add_guest(delta.storage_root)
        vm = running_guest(server, hosts, name, "slow", disk_mb=128, data_mb=64)
        before = boot_id(slow.storage_root, name)
        task = vm.migrate("delta")
        follow(task, vm, until=lambda percent: percent >= 10)
        assert not task.is_complete
        assert pids_of(f"{delta.storage_root}/vms/{name}/")  # its QEMU is receiving
        delta.kill()  # the worker and its pool; the daemonized QEMU survives
        assert task.wait_for_completion(90_000)
        assert task.result is VMTaskResult.ThreadCrashError, task.error_description
        assert where(vm) == ("slow", S.Running)
        assert boot_id(slow.storage_root, name) == before
        # The restarted worker removes the half-received VM: QEMU, disks, directory.
        delta = WorkerProcess(redis_url, "delta", base / "d", base, concurrency=2,
                              env=FAST).start()
        assert nothing_of(delta, name) == []
        done(vm.turn_off())
        done(vm.delete())
    finally:
        stop_all(delta)


def test_kill_9_of_the_source_worker_leaves_the_guest_on_the_source(
        server: VirtualServer, hosts: dict[str, WorkerProcess], redis_url: str, base: Path,
        name: str) -> None:
    beta = hosts["beta"]
    sigma = WorkerProcess(redis_url, "sigma", base / "s", base, concurrency=2, env=SLOW).start()
    try:
        add_guest(sigma.storage_root)
        vm = running_guest(server, {"sigma": sigma}, name, "sigma", disk_mb=128, data_mb=64)
        before = boot_id(sigma.storage_root, name)
        task = vm.migrate("beta")
        follow(task, vm, until=lambda percent: percent >= 10)
        assert not task.is_complete
        sigma.kill()  # mid-mirror; the guest's daemonized QEMU survives
        assert task.wait_for_completion(60_000)
        assert task.result is VMTaskResult.ThreadCrashError, task.error_description
        # beta's task notices the source is gone and drops what it received.
        wait_until(lambda: nothing_of(beta, name) == [], 60, "beta to drop the migration")
        assert boot_id(sigma.storage_root, name) == before  # the guest ran on throughout
        sigma = WorkerProcess(redis_url, "sigma", base / "s", base, concurrency=2,
                              env=FAST).start()
        assert where(vm) == ("sigma", S.Running)
        # The restarted worker took the guest back from the mirror QEMU still held.
        monitor = Monitor(qemu_vm.VMPaths(sigma.storage_root / "vms" / name))
        with monitor:
            assert monitor.execute("query-jobs") == []
            assert not [n for n in monitor.execute("query-named-block-nodes")
                        if n["node-name"].startswith("migrate-target")]
            assert monitor.execute("query-status")["status"] == "running"
        assert boot_id(sigma.storage_root, name) == before
        done(vm.migrate("beta"))  # and it can go now
        assert where(vm) == ("beta", S.Running)
        assert boot_id(beta.storage_root, name) == before
        done(vm.turn_off())
        done(vm.delete())
    finally:
        stop_all(sigma)


def test_taking_back_and_taking_over_fence_each_other(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)

    def abort(record: str, transfer: str) -> str:
        return str(Scripts.of(client).vm_move_abort(record=record, transfer=transfer,
                                                    wake=transfer + ":w", source="a"))

    def move(record: str, transfer: str) -> str:
        return str(Scripts.of(client).vm_move(
            record=record, events=keys.VM_EVENTS, transfer=transfer, source="a",
            destination="b", allowed=f"{int(S.Running)},{int(S.Paused)}", now="0",
            max_events=100))

    for first in ("abort", "move"):
        record, transfer = keys.vm_record(f"fence-{first}"), keys.transfer(f"fence-{first}")
        client.hset(record, mapping={"name": f"fence-{first}", "host": "a",
                                     "state": str(int(S.Running))})
        if first == "abort":
            assert (abort(record, transfer), move(record, transfer)) == ("ABORTED", "ABORTED")
            assert client.hget(record, "host") == "a"
        else:
            assert (move(record, transfer), abort(record, transfer)) == ("OK", "MOVED")
            assert client.hget(record, "host") == "b"
        client.delete(record, transfer, transfer + ":w")


def engine_pair(tmp_path: Path, vm: str) -> tuple[Callable[[str], qemu_vm.VMConfig],
                                                  qemu_vm.VMPaths, qemu_vm.VMPaths]:
    """The engine alone, no workers: (the tiny guest's configuration on side "a" or
    "b" of ``tmp_path``, each with a fresh 16 MB disk, the source's paths, the
    destination's)."""
    guest = build_tiny_guest()

    def config(side: str) -> qemu_vm.VMConfig:
        disk = tmp_path / side / "d.qcow2"
        if not disk.exists():
            disk.parent.mkdir()
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"],
                           check=True)
        return qemu_vm.VMConfig(
            name=vm, memory_mb=128, accel="tcg", disks=[str(disk)],
            kernel=str(guest.kernel), initrd=str(guest.initrd), append=guest.append,
            extra_args=qemu_guest_agent_args(tmp_path / side / "vms" / vm / "qga.sock"))

    source, target = (qemu_vm.VMPaths(tmp_path / side / "vms" / vm) for side in "ab")
    return config, source, target


def test_taking_the_guest_back_after_a_completed_migration(tmp_path: Path) -> None:
    """The engine alone: once QEMU's migration has completed (the source guest is
    stopped, its disks let go) but before the switch-over, the source resumes it."""
    context = NullContext()
    config, source, target = engine_pair(tmp_path, "back")
    qemu_vm.start(config("a"), source, context)
    try:
        wait_for_agent(tmp_path / "a", "back")
        before = boot_id(tmp_path / "a", "back")
        incoming = livemigrate.start_incoming(
            config("b"), target, context, address="127.0.0.1", ports=(49152, 49407),
            exports=(livemigrate.new_export_name(),))
        with qemu_vm.connect(source) as monitor:
            outgoing = livemigrate.Outgoing.begin(monitor, config("a"), context)
            outgoing.mirror(incoming)
            outgoing.wait_ready(context, lambda: None, time.monotonic() + 60)
            outgoing.migrate(incoming, context, lambda: None, time.monotonic() + 60)
            assert monitor.execute("query-status")["status"] == "postmigrate"
            outgoing.rollback()
            assert monitor.execute("query-status")["status"] == "running"
            assert monitor.execute("query-jobs") == []
        assert boot_id(tmp_path / "a", "back") == before
        with agent(tmp_path / "a", "back") as client:
            guest_write(client, 9)  # its disk is writable again
    finally:
        qemu_vm.turn_off(target)
        qemu_vm.turn_off(source)
    qemu_io(tmp_path / "a" / "d.qcow2", "qcow2", f"read -P 9 0 {BLOCK}")


def test_the_destination_waits_for_its_own_side_of_the_migration(tmp_path: Path) -> None:
    """The engine alone: the destination asked to switch over while its incoming
    migration is still under way (as when the source has read "completed" first and
    the destination host is busy) waits for it to complete, then runs the guest."""
    context = NullContext()
    config, source, target = engine_pair(tmp_path, "wait")
    qemu_vm.start(config("a"), source, context)
    try:
        wait_for_agent(tmp_path / "a", "wait")
        before = boot_id(tmp_path / "a", "wait")
        incoming = livemigrate.start_incoming(
            config("b"), target, context, address="127.0.0.1", ports=(49152, 49407),
            exports=(livemigrate.new_export_name(),))
        with qemu_vm.connect(source) as out, qemu_vm.connect(target) as into:
            # 8 MiB/s: the RAM takes a while, so the destination is surely mid-way.
            outgoing = livemigrate.Outgoing.begin(out, config("a"), context,
                                                  max_bandwidth=8 << 20)
            outgoing.mirror(incoming)
            outgoing.wait_ready(context, lambda: None, time.monotonic() + 60)
            final: list[dict[str, Any]] = []
            migrating = threading.Thread(target=lambda: final.append(outgoing.migrate(
                incoming, context, lambda: None, time.monotonic() + 120)))
            migrating.start()
            try:
                wait_until(lambda: into.execute("query-migrate").get("status") == "active",
                           30, "the destination to receive")
                livemigrate.wait_incoming(into)
                assert into.execute("query-migrate")["status"] == "completed"
            finally:
                migrating.join(120)
            assert final and final[0]["status"] == "completed"
            outgoing.finish_mirrors(time.monotonic() + 30)
            livemigrate.stop_serving(into)
            livemigrate.run_guest(into, run=True)
        assert boot_id(tmp_path / "b", "wait") == before
    finally:
        qemu_vm.turn_off(target)
        qemu_vm.turn_off(source)


def test_kill_9_of_the_destination_qemu_leaves_the_guest_on_the_source(
        server: VirtualServer, hosts: dict[str, WorkerProcess], name: str) -> None:
    slow, beta = hosts["slow"], hosts["beta"]
    vm = running_guest(server, hosts, name, "slow", disk_mb=128, data_mb=64)
    before = boot_id(slow.storage_root, name)
    task = vm.migrate("beta")
    follow(task, vm, until=lambda percent: percent >= 10)
    receiving = pids_of(f"{beta.storage_root}/vms/{name}/")
    assert len(receiving) == 1 and not task.is_complete
    os.kill(receiving[0], signal.SIGKILL)
    assert task.wait_for_completion(60_000)
    assert task.result not in (VMTaskResult.Success, VMTaskResult.Cancelled)
    # The mirror or the migration broke, or the destination task failed first.
    assert any(word in task.error_description.lower()
               for word in ("destination", "mirror", "migration")), task.error_description
    assert where(vm) == ("slow", S.Running)
    assert boot_id(slow.storage_root, name) == before
    wait_until(lambda: nothing_of(beta, name) == [], 30, "beta to drop the migration")
    done(vm.migrate("beta"))  # nothing of the failed attempt is in the way
    assert where(vm) == ("beta", S.Running) and boot_id(beta.storage_root, name) == before
    done(vm.turn_off())
    done(vm.delete())


def test_a_destination_without_room_is_refused_before_anything_moves(
        server: VirtualServer, hosts: dict[str, WorkerProcess], redis_url: str, base: Path,
        name: str) -> None:
    small = base / "t"
    small.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(small)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    tiny = WorkerProcess(redis_url, "tiny", small, base, concurrency=2, env=FAST)
    try:
        tiny.start()
        add_guest(small)  # about 15 MB of the 40: 25 MB left, the disk holds 32 MB
        vm = running_guest(server, hosts, name, "alpha", disk_mb=64, data_mb=32)
        before = boot_id(hosts["alpha"].storage_root, name)
        task = vm.migrate("tiny")
        assert task.wait_for_completion(60_000)
        assert (task.result, task.error) == (VMTaskResult.DiskRelatedError, hresults.DISK_FULL)
        assert nothing_of(tiny, name) == []
        assert where(vm) == ("alpha", S.Running)
        assert boot_id(hosts["alpha"].storage_root, name) == before
        done(vm.turn_off())
        done(vm.delete())
    finally:
        stop_all(tiny)
        subprocess.run(["umount", str(small)], check=False)


def test_with_a_pre_shared_key_the_channels_refuse_plain_clients(
        server: VirtualServer, redis_url: str, base: Path, name: str) -> None:
    psk = base / "psk"
    psk.mkdir(exist_ok=True)
    (psk / "keys.psk").write_text(f"qemu:{os.urandom(32).hex()}\n")
    tls = {"VMTASK_TRANSFER_PSK_DIR": str(psk)}
    ta = WorkerProcess(redis_url, "ta", base / "ta", base, concurrency=2, env={**SLOW, **tls})
    tb = WorkerProcess(redis_url, "tb", base / "tb", base, concurrency=2, env={**FAST, **tls})
    try:
        for worker in (ta, tb):
            worker.start()
            add_guest(worker.storage_root)
        vm = running_guest(server, {"ta": ta}, name, "ta", disk_mb=64, data_mb=32)
        before = boot_id(ta.storage_root, name)
        task = vm.migrate("tb")

        arguments = json.loads(server.redis.hget(keys.task_record(task.id), "arguments"))
        transfer = keys.transfer(arguments["transfer_id"])

        def incoming() -> dict[str, Any] | None:
            raw = server.redis.hget(transfer, "incoming")
            return dict(json.loads(raw)) if raw else None

        offer = wait_until(incoming, 60, "the destination's exports")
        plain = subprocess.run(
            ["qemu-img", "info", f"nbd://{offer['address']}:{offer['nbd_port']}/"
                                 f"{offer['exports'][0]}"], capture_output=True, text=True)
        assert not task.is_complete  # the client came while the disk was on its way
        assert plain.returncode != 0 and "TLS" in plain.stderr, plain.stderr
        done(task)
        assert where(vm) == ("tb", S.Running)
        assert boot_id(tb.storage_root, name) == before
        done(vm.turn_off())
        done(vm.delete())
    finally:
        stop_all(ta, tb)
