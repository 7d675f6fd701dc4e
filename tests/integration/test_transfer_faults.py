"""Transfers across Redis faults: a restart (SIGTERM, AOF) or a kill -9 of Redis
while a cross-host copy, a cold move or a live migration runs, or while a copy waits
in its queue, is ridden out; a Redis that stays away ends the transfer with a named
result.  Two real workers with separate roots, a real redis-server of the test's
own (appendonly), real qemu-img and qemu-nbd; the pull's qemu-img is held still
(SIGSTOP) across the fault, so the fault surely meets the transfer mid-way."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from api import VirtualServer, VMTask, VMTaskResult, VMVMState
from api.protocol import keys
from tests.faults import held, peer_of, restart
from tests.helpers import assert_succeeded as done
from tests.helpers import big_image, digest, qemu_io
from workers.devtools.sandbox import RedisServer, WorkerProcess, wait_until
from workers.devtools.tinyguest import build_tiny_guest

pytestmark = pytest.mark.slow
S = VMVMState


def durable(redis: RedisServer) -> None:
    """Every write Redis took so far is on disk (WAITAOF is Redis 7.2's; on 7.0 a
    BGREWRITEAOF finishing does the same)."""
    client = redis.client()
    client.bgrewriteaof()
    wait_until(lambda: client.info("persistence")["aof_rewrite_in_progress"] == 0
               and client.info("persistence")["aof_rewrite_scheduled"] == 0, 30,
               "the AOF rewrite")


@pytest.fixture
def pair(spawn: Callable[..., Any]) -> tuple[RedisServer, WorkerProcess, WorkerProcess]:
    redis = spawn("redis", appendonly=True)
    source = spawn("worker", redis_url=redis.url, host="tfa", concurrency=2)
    destination = spawn("worker", redis_url=redis.url, host="tfb", concurrency=1)
    return redis, source, destination


def leftovers(root: Path) -> list[str]:
    """Temporaries of a pull (``<name>.vmtask-<task>.tmp``) left in a root."""
    return [str(p.relative_to(root)) for p in root.rglob("*.vmtask-*.tmp")]


def copy_across(server: VirtualServer, source: WorkerProcess, name: str,
                size_mb: int = 48) -> tuple[VMTask, str]:
    original = big_image(source.storage_root, f"{name}/big.img", size_mb)
    task = server.get_hard_disk(f"{name}/big.img").copy_to("tfb", f"{name}/copy.img")
    return task, digest(original)


@pytest.mark.parametrize("kill", [False, True], ids=["restart", "kill9"])
def test_a_redis_restart_mid_copy_is_ridden_out(
        pair: tuple[RedisServer, WorkerProcess, WorkerProcess], kill: bool) -> None:
    redis, source, destination = pair
    with VirtualServer(redis.url, host="tfa", poll_interval=0.2) as server:
        task, want = copy_across(server, source, "c")
        with held(task.id):
            if kill:
                durable(redis)  # kill -9 loses up to a second: not the start itself
            restart(redis, kill=kill)
        done(task, 120_000)
        assert digest(destination.storage_root / "c" / "copy.img") == want
        serve = peer_of(server, task, "server_task_id")
        done(serve, 30_000)
        assert leftovers(destination.storage_root) == []
        client = redis.client()
        assert [client.hget(keys.task_record(t.id), "runs") for t in (task, serve)] == ["1",
                                                                                        "1"]


def test_a_copy_queued_before_a_redis_restart_runs_after_it(
        pair: tuple[RedisServer, WorkerProcess, WorkerProcess]) -> None:
    """The pull waits behind a busy slot on tfb while its serve waits on tfa; Redis
    restarts; the slot frees; the pull runs against a serve that rode it out."""
    redis, source, destination = pair
    with VirtualServer(redis.url, host="tfa", poll_interval=0.2) as server:
        busy = server.ping(duration_ms=60_000, steps=60, host="tfb")
        wait_until(lambda: busy.snapshot().state == "STARTED", 30, "the busy task to start")
        task, want = copy_across(server, source, "q", size_mb=8)
        serve = peer_of(server, task, "server_task_id")
        wait_until(lambda: serve.snapshot().state == "STARTED", 30, "the serve to wait")
        assert task.snapshot().state == "PENDING"
        restart(redis)
        busy.cancel()
        done(task, 120_000)
        assert digest(destination.storage_root / "q" / "copy.img") == want
        done(serve, 30_000)
        assert leftovers(destination.storage_root) == []


def test_a_redis_restart_mid_cold_move_is_ridden_out(
        pair: tuple[RedisServer, WorkerProcess, WorkerProcess]) -> None:
    redis, source, destination = pair
    with VirtualServer(redis.url, host="tfa", poll_interval=0.2) as server:
        original = big_image(source.storage_root, "mv/d.img", 48)
        want = digest(original)
        vm = server.create_virtual_machine("mv", memory_mb=32, disks=["mv/d.img"],
                                           network=None)
        task = vm.migrate("tfb")
        with held(task.id):
            restart(redis)
        done(task, 120_000)
        assert vm.state is S.TurnedOff  # reads the record, and with it the host
        assert vm.host == "tfb"
        assert digest(destination.storage_root / "mv" / "d.img") == want
        done(peer_of(server, task, "server_task_id"), 30_000)
        wait_until(lambda: not original.exists(), 30, "the source to let go")
        assert leftovers(destination.storage_root) == []


def test_a_redis_that_stays_away_ends_the_copy_with_a_named_result(
        spawn: Callable[..., Any]) -> None:
    """Away longer than the stall bound (3 s) and the lease (4 s): each side ends
    TimeOutError or ThreadCrashError once Redis returns, never UnexpectedError, and
    the destination keeps nothing."""
    redis = spawn("redis", appendonly=True)
    fast = {"VMTASK_TRANSFER_STALL_SECONDS": "3", "VMTASK_LEASE_SECONDS": "4",
            "VMTASK_HEARTBEAT_SECONDS": "2"}
    source = spawn("worker", redis_url=redis.url, host="tfa", concurrency=2, env=fast)
    destination = spawn("worker", redis_url=redis.url, host="tfb", concurrency=1, env=fast)
    with VirtualServer(redis.url, host="tfa", poll_interval=0.2) as server:
        task, _ = copy_across(server, source, "away")
        serve = peer_of(server, task, "server_task_id")
        with held(task.id):
            restart(redis, down=12.0)
            back = time.monotonic()
            assert serve.wait_for_completion(30_000)
        assert task.wait_for_completion(30_000)
        ended = time.monotonic() - back
        named = (VMTaskResult.TimeOutError, VMTaskResult.ThreadCrashError)
        assert serve.result in named, (serve.result, serve.error_description)
        assert task.result in named, (task.result, task.error_description)
        assert ended < 20, ended
        assert not (destination.storage_root / "away" / "copy.img").exists()
        wait_until(lambda: leftovers(destination.storage_root) == [], 30, "no temporary")


def test_a_redis_restart_mid_live_migration_is_ridden_out(
        spawn: Callable[..., Any], tmp_path: Path) -> None:
    redis = spawn("redis", appendonly=True)
    # Slow enough (8 MiB/s) for the restart to meet the mirror and the migration.
    slow = {"VMTASK_HEARTBEAT_SECONDS": "1", "VMTASK_MIGRATE_MAX_BANDWIDTH": str(8 << 20)}
    hosts = {name: spawn("worker", redis_url=redis.url, host=name, concurrency=2, env=slow)
             for name in ("tla", "tlb")}
    guest = build_tiny_guest()
    for worker in hosts.values():
        (worker.storage_root / "guest").mkdir(parents=True, exist_ok=True)
        shutil.copy(guest.kernel, worker.storage_root / "guest" / "vmlinuz")
        shutil.copy(guest.initrd, worker.storage_root / "guest" / "initrd.gz")
    alpha, beta = hosts["tla"].storage_root, hosts["tlb"].storage_root
    with VirtualServer(redis.url, host="tla", poll_interval=0.2) as server:
        done(server.create_dynamic_virtual_hard_disk("lv/d.qcow2", 64))
        qemu_io(alpha / "lv" / "d.qcow2", "qcow2", "write -P 0x5a 1M 24M")
        pristine = tmp_path / "pristine.qcow2"
        shutil.copy(alpha / "lv" / "d.qcow2", pristine)
        vm = server.create_virtual_machine(
            "lv", memory_mb=128, disks=["lv/d.qcow2"], network=None,
            kernel="guest/vmlinuz", initrd="guest/initrd.gz",
            append="console=ttyS0 quiet panic=-1")
        done(vm.startup())
        try:
            task = vm.migrate("tlb")
            wait_until(lambda: task.percent_completed > 0 or task.is_complete, 60,
                       "the mirror to start")
            assert not task.is_complete
            restart(redis)
            done(task, 180_000)
            assert vm.state is S.Running  # reads the record, and with it the host
            assert vm.host == "tlb"
            done(peer_of(server, task, "peer_task_id"), 30_000)
            wait_until(lambda: not (alpha / "lv").exists() or not any(
                (alpha / "lv").iterdir()), 30, "the source to let go")
            done(vm.turn_off())
            compared = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2",
                                       str(pristine), str(beta / "lv" / "d.qcow2")],
                                      capture_output=True, text=True)
            assert compared.returncode == 0, compared.stdout + compared.stderr
        finally:
            if vm.state is not S.TurnedOff:
                vm.turn_off().wait_for_completion(60_000)
