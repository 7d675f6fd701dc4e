"""A live migration whose worker dies at a step where the other host already holds
the VM, and a peer whose lease is missing for one reading only: real workers and
QEMU (TCG) for the first, a real Redis for the second.

The workers here stop at an exact step through `tests.pause_points` (a QMP command
they never send), so each kill -9 lands where the test means it to."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis

from api import VirtualServer, VMTaskResult, VMVMState
from api.protocol import keys, records
from api.settings import Settings
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
    where,
)
from tests.helpers import assert_succeeded as done
from tests.helpers import pids_of, qemu_io
from tests.pause_points import PAUSING, pause_env
from workers.devtools.sandbox import RedisServer, WorkerProcess, wait_until
from workers.engines import qemu_vm
from workers.failures import PeerFailed
from workers.tasks import transfer
from workers.tasks.transfer import PeerWatch

S = VMVMState


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Short paths: QEMU's unix sockets live under the storage roots (108-byte limit).
    return Path(tmp_path_factory.mktemp("lr"))


@pytest.fixture(scope="module")
def redis_url(base: Path) -> Iterator[str]:
    server = RedisServer(base / "redis").start()
    yield server.url
    server.stop()


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    return "lr" + str(abs(hash(request.node.name)) % 10**6)


def worker(redis_url: str, base: Path, host: str, *, pause: str = "",
           marker: Path | None = None) -> WorkerProcess:
    if pause:
        assert marker is not None
        return WorkerProcess(redis_url, host, base / host, base, concurrency=2,
                             env={**FAST, **pause_env(pause, marker)}, include=PAUSING)
    return WorkerProcess(redis_url, host, base / host, base, concurrency=2, env=FAST)


def same_disk(a: Path, b: Path) -> None:
    compared = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(a),
                               str(b)], capture_output=True, text=True)
    assert compared.returncode == 0, compared.stdout + compared.stderr


@pytest.mark.slow
def test_kill_9_of_the_source_worker_after_the_switch_over(
        redis_url: str, base: Path, name: str, tmp_path: Path) -> None:
    """The destination runs the guest; the source dies before removing its copies:
    its restart removes them, the QEMU it left too."""
    marker = base / f"{name}.paused"
    source = worker(redis_url, base, "ls1", pause="quit", marker=marker).start()
    target = worker(redis_url, base, "ld1").start()
    try:
        for host in (source, target):
            add_guest(host.storage_root)
        with VirtualServer(redis_url, host="ls1", poll_interval=0.2) as server:
            vm = running_guest(server, {"ls1": source}, name, "ls1", disk_mb=32, data_mb=4)
            before = boot_id(source.storage_root, name)
            with agent(source.storage_root, name) as client:
                guest_write(client, 0x77)
            task = vm.migrate("ld1")
            wait_until(marker.exists, 120, "the source to reach its quit")
            # The destination has taken over and runs the guest; the source QEMU
            # stopped it at the switch-over and let go of its disk.
            assert server.redis.hget(keys.vm_record(name), "host") == "ld1"
            at_switch = tmp_path / "switch.qcow2"
            shutil.copy(source.storage_root / name / "d.qcow2", at_switch)
            source.kill()
            assert task.wait_for_completion(90_000)
            assert task.result is VMTaskResult.ThreadCrashError, task.error_description
            assert (source.storage_root / name / "d.qcow2").exists()  # not yet removed
            source = worker(redis_url, base, "ls1").start()
            assert nothing_of(source, name) == []
            assert where(vm) == ("ld1", S.Running)
            assert boot_id(target.storage_root, name) == before
            done(vm.turn_off())
            disk = target.storage_root / name / "d.qcow2"
            same_disk(at_switch, disk)
            qemu_io(disk, "qcow2", f"read -P 0x77 0 {BLOCK}", "read -P 0x5a 1M 4M")
            done(vm.delete())
    finally:
        stop_all(source, target)


@pytest.mark.slow
def test_kill_9_of_the_destination_worker_between_the_switch_over_and_cont(
        redis_url: str, base: Path, name: str) -> None:
    """The record names the destination, whose worker dies before running the guest:
    its restart runs it, as it ran on the source."""
    marker = base / f"{name}.paused"
    source = worker(redis_url, base, "ls2").start()
    target = worker(redis_url, base, "ld2", pause="cont", marker=marker).start()
    try:
        for host in (source, target):
            add_guest(host.storage_root)
        with VirtualServer(redis_url, host="ls2", poll_interval=0.2) as server:
            vm = running_guest(server, {"ls2": source}, name, "ls2", disk_mb=32, data_mb=4)
            before = boot_id(source.storage_root, name)
            with agent(source.storage_root, name) as client:
                guest_write(client, 0x66)
            task = vm.migrate("ld2")
            wait_until(marker.exists, 120, "the destination to reach its cont")
            assert server.redis.hget(keys.vm_record(name), "host") == "ld2"
            target.kill()
            # (Its QMP socket was the dead worker's until now: one client at a time.)
            paths = qemu_vm.VMPaths(target.storage_root / "vms" / name)
            with qemu_vm.connect(paths) as monitor:
                assert monitor.execute("query-status")["status"] == "paused"
            assert task.wait_for_completion(90_000)
            # The source let go (the record names the destination) and removed its
            # copies; the task says the destination's worker died.
            assert nothing_of(source, name) == []
            target = worker(redis_url, base, "ld2").start()
            with qemu_vm.connect(paths) as monitor:
                assert monitor.execute("query-status")["status"] == "running"
                assert monitor.execute("query-block-jobs") == []
            assert where(vm) == ("ld2", S.Running)
            assert boot_id(target.storage_root, name) == before
            pid = int(vm.details["pid"])
            assert pid in pids_of(f"{target.storage_root}/vms/{name}/")
            assert not (paths.directory / "incoming.json").exists()
            assert task.result is VMTaskResult.ThreadCrashError, task.error_description
            assert "after the VM had moved" in task.error_description
            done(vm.turn_off())
            qemu_io(target.storage_root / name / "d.qcow2", "qcow2",
                    f"read -P 0x66 0 {BLOCK}", "read -P 0x5a 1M 4M")
            done(vm.delete())
    finally:
        stop_all(source, target)


@pytest.mark.slow
def test_a_source_killed_after_signalling_the_switch_over_fences_the_destination_out(
        redis_url: str, base: Path, name: str) -> None:
    """The source dies once it has told the destination to take over, and restarts
    before the destination's compare-and-set: its successor takes the guest back
    only by winning the fence, so the destination, going on, refuses to run it."""
    marker = base / f"{name}.paused"
    source = worker(redis_url, base, "ls4").start()
    target = worker(redis_url, base, "ld4", pause="nbd-server-stop", marker=marker).start()
    try:
        for host in (source, target):
            add_guest(host.storage_root)
        with VirtualServer(redis_url, host="ls4", poll_interval=0.2) as server:
            vm = running_guest(server, {"ls4": source}, name, "ls4", disk_mb=32, data_mb=4)
            before = boot_id(source.storage_root, name)
            task = vm.migrate("ld4")
            arguments = json.loads(server.redis.hget(keys.task_record(task.id), "arguments"))
            wait_until(marker.exists, 120, "the destination to reach its switch-over")
            assert server.redis.hget(keys.transfer(arguments["transfer_id"]), "switch") == "1"
            source.kill()  # waiting for the destination to commit
            source = worker(redis_url, base, "ls4").start()
            paths = qemu_vm.VMPaths(source.storage_root / "vms" / name)
            with qemu_vm.connect(paths) as monitor:
                assert monitor.execute("query-status")["status"] == "running"
            marker.unlink()  # the destination goes on to its compare-and-set
            into = server.get_task(arguments["peer_task_id"])
            assert into.wait_for_completion(60_000)
            assert into.result is VMTaskResult.Cancelled, into.error_description
            wait_until(lambda: nothing_of(target, name) == [], 30, "ld4 to drop the VM")
            assert where(vm) == ("ls4", S.Running)
            assert boot_id(source.storage_root, name) == before
            assert not (paths.directory / "outgoing.json").exists()
            assert task.wait_for_completion(90_000)
            assert task.result is VMTaskResult.ThreadCrashError, task.error_description
            done(vm.turn_off())
            done(vm.delete())
    finally:
        stop_all(source, target)


# -- a peer's lease missing for one reading ---------------------------------------------


def started_peer(client: redis.Redis) -> str:
    task_id = f"peer-{uuid.uuid4().hex[:8]}"
    client.hset(keys.task_record(task_id), mapping={"state": records.STARTED})
    return task_id


def test_a_lease_missing_once_does_not_end_the_wait_for_an_offer(redis_url: str) -> None:
    """As during a Redis failover: the serve's lease is missing at one reading, and
    taken back by its renewer before the next.  The pull waits on for the offer."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    server_task = started_peer(client)  # no lease: the first reading misses it
    transfer_id = uuid.uuid4().hex
    steps = iter([
        lambda: client.set(keys.task_lease(server_task), "h:m:1", px=60_000),
        lambda: client.hset(keys.transfer(transfer_id), mapping={"address": "127.0.0.1"}),
    ])
    run = SimpleNamespace(redis=client, settings=Settings(lease_seconds=3.0),
                          sleep=lambda seconds: next(steps)(),
                          ride_out=lambda call, what: call())
    offer = transfer._wait_for_offer(run, transfer_id, server_task, "ls3")  # type: ignore[arg-type]
    assert offer == {"address": "127.0.0.1"}


def test_a_lease_missing_for_the_confirmation_time_is_a_death(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    peer = started_peer(client)
    watch = PeerWatch(client, peer, "ls3", confirm_seconds=0.5)
    watch.check("source")  # missing once: no verdict yet
    client.set(keys.task_lease(peer), "h:m:1", px=60_000)
    watch.check("source")  # back: the clock starts over
    client.delete(keys.task_lease(peer))
    missing = time.monotonic()
    watch.check("source")

    def judged() -> bool:
        try:
            watch.check("source")
        except PeerFailed as failure:
            assert failure.result is VMTaskResult.ThreadCrashError
            return True
        return False

    wait_until(judged, 5, "the verdict", interval=0.05)
    assert time.monotonic() - missing >= 0.5
    # Queued on a host without a heartbeat: the same two readings.
    queued = f"peer-{uuid.uuid4().hex[:8]}"
    client.hset(keys.task_record(queued), mapping={"state": records.PENDING})
    watch = PeerWatch(client, queued, "ls3", confirm_seconds=0.5)
    watch.check("source")
    assert not watch.over()
    wait_until(watch.over, 5, "the verdict on a queued peer", interval=0.05)
