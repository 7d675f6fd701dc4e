"""Delivery under faults: a task runs exactly once, is never stranded, control never
waits behind long work, no message stops a worker, a frozen Redis never hangs.

Each test provokes the fault itself against real redis-servers, real workers and
real qemu: a duplicate message, kill -9, a Redis restart, SIGSTOP, garbage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from api import VirtualServer, VMHardDiskType, VMTask, VMTaskResult, VMVMState, errors
from api.protocol import keys, tasks
from tests.helpers import assert_succeeded as ok
from tests.helpers import pids_of, qemu_io
from workers.devtools.sandbox import REPO_ROOT, wait_until

pytestmark = pytest.mark.slow


def send_copy(server: VirtualServer, task_id: str, spec: tasks.TaskSpec,
              kwargs: dict[str, Any], host: str) -> None:
    """A second delivery of a task's message, as a broker redelivery would make."""
    server.celery.send_task(spec.name, kwargs=kwargs, task_id=task_id,
                            queue=keys.host_queue(host), routing_key=keys.host_queue(host))



def test_a_copy_delivered_while_a_convert_runs_never_runs(spawn: Callable[..., Any]) -> None:
    redis = spawn("redis")
    worker = spawn("worker", redis_url=redis.url, host="dup", concurrency=2)
    server = VirtualServer(redis.url, host="dup", poll_interval=0.5)
    ok(server.create_dynamic_virtual_hard_disk("src.qcow2", 256))
    source = worker.storage_root / "src.qcow2"
    qemu_io(source, "qcow2", "write -P 0x5a 0 64M", "write -P 0xa5 192M 64M")
    task = server.get_hard_disk("src.qcow2").convert("out.vhd", VMHardDiskType.FixedSize)
    # Hold the original's qemu-img still, so the copy surely arrives while it runs.
    qemu_pids = wait_until(lambda: pids_of(f"vmtask-{task.id}"), 30, "the convert's qemu-img")
    for pid in qemu_pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        assert task.snapshot().state == "STARTED"
        send_copy(server, task.id, tasks.DISK_CONVERT,
                  {"path": "src.qcow2", "destination": "out.vhd",
                   "disk_type": int(VMHardDiskType.FixedSize)}, "dup")
        wait_until(lambda: f"{task.id}: its record is STARTED" in worker.log(), 30,
                   "the copy to meet the start gate")
        snap = task.snapshot()
        assert (snap.state, snap.result) == ("STARTED", None)  # the copy wrote nothing
        assert redis.client().exists(keys.task_lease(task.id)) == 1
    finally:
        for pid in qemu_pids:
            os.kill(pid, signal.SIGCONT)
    ok(task)
    assert redis.client().hget(keys.task_record(task.id), "runs") == "1"
    qemu_io(worker.storage_root / "out.vhd", "vpc", "read -P 0x5a 0 64M", "read -P 0 64M 128M",
            "read -P 0xa5 192M 64M")


def test_save_copy_never_runs(spawn: Callable[..., Any]) -> None:
    redis = spawn("redis")
    # Short names: the VM's QMP socket path must fit a unix socket address.
    worker = spawn("worker", redis_url=redis.url, host="ds", concurrency=2,
                   env={"VMTASK_SAVE_MAX_BANDWIDTH": "2000000"})
    server = VirtualServer(redis.url, host="ds", poll_interval=0.5)
    vm = server.create_virtual_machine("ds1", memory_mb=64)
    try:
        ok(vm.startup())
        task = vm.save()
        wait_until(lambda: task.percent_completed > 0 or task.is_complete, 60, "save progress")
        send_copy(server, task.id, tasks.VM_SAVE, {"name": "ds1"}, "ds")
        wait_until(lambda: f"{task.id}: its record is" in worker.log(), 30,
                   "the copy to meet the start gate")
        ok(task, timeout=300_000)
        assert redis.client().hget(keys.task_record(task.id), "runs") == "1"
        assert f"{task.id}: its record is STARTED" in worker.log()  # it came mid-save
        assert vm.state is VMVMState.Saved
        ok(vm.startup())  # the state file the one run wrote restores
        assert vm.state is VMVMState.Running
    finally:
        if vm.state is not VMVMState.TurnedOff:
            vm.turn_off().wait_for_completion(60_000)


def test_a_task_queued_behind_a_killed_worker_runs_on_the_next(
        spawn: Callable[..., Any], tmp_path: Path) -> None:
    redis = spawn("redis")
    doomed = spawn("worker", redis_url=redis.url, host="strand", concurrency=1,
                   env={"VMTASK_LEASE_SECONDS": "3"})
    server = VirtualServer(redis.url, host="strand", poll_interval=0.5)
    running = server.ping(duration_ms=60_000, steps=60)
    wait_until(lambda: running.snapshot().state == "STARTED", 20, "the long task to start")
    marker = tmp_path / "ran.txt"
    behind = server.submit("tests.write_marker", description="behind", cancelable=True,
                           kwargs={"path": str(marker)})
    time.sleep(0.5)  # give the busy worker every chance to (wrongly) reserve it
    doomed.kill()
    spawn("worker", redis_url=redis.url, host="strand", concurrency=1)
    assert behind.wait_for_completion(60_000), "stranded: never ran after the kill"
    assert behind.result is VMTaskResult.Success
    assert marker.read_text().split() == [behind.id]
    assert running.wait_for_completion(30_000)
    assert running.result is VMTaskResult.ThreadCrashError


def test_every_waiting_producer_returns_after_a_redis_restart(
        spawn: Callable[..., Any], tmp_path: Path) -> None:
    redis = spawn("redis", appendonly=True)
    spawn("worker", redis_url=redis.url, host="restart", concurrency=2)
    server = VirtualServer(redis.url, host="restart", poll_interval=0.5)
    submitted = [server.ping(duration_ms=1500) for _ in range(16)]
    results: dict[str, bool] = {}
    # Each waiter is its own producer, attached before the restart.
    producers = [VirtualServer(redis.url, host="restart", poll_interval=0.5) for _ in submitted]
    handles = [own.get_task(t.id) for own, t in zip(producers, submitted, strict=True)]

    def wait(task: VMTask) -> None:
        results[task.id] = task.wait_for_completion(90_000)

    waiters = [threading.Thread(target=wait, args=(h,)) for h in handles]
    for waiter in waiters:
        waiter.start()
    wait_until(lambda: any(t.snapshot().state == "STARTED" for t in submitted), 20, "a start")
    redis.stop()
    redis.start()
    started = time.monotonic()
    for waiter in waiters:  # the promise: every wait returns within 60 s of the restart
        waiter.join(timeout=max(0.1, 60 - (time.monotonic() - started)))
    for own in producers:
        own.close()
    assert all(results.get(t.id) for t in submitted), results
    client = redis.client()
    for task in submitted:
        assert task.result in (VMTaskResult.Success, VMTaskResult.ThreadCrashError)
        assert client.hget(keys.task_record(task.id), "runs") == "1"


def test_garbage_and_forged_messages_never_stop_a_worker(spawn: Callable[..., Any]) -> None:
    redis = spawn("redis")
    worker = spawn("worker", redis_url=redis.url, host="garbage", concurrency=1)
    client = redis.client()
    queue = keys.host_queue("garbage")
    not_base64 = {"body": "%%% not base64 %%%", "content-encoding": "utf-8",
                  "content-type": "application/json", "headers": {},
                  "properties": {"body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
                                 "delivery_info": {"exchange": "", "routing_key": queue},
                                 "priority": 0}}
    raw = redis.client()
    raw_bytes = __import__("redis").Redis.from_url(redis.url)
    raw_bytes.lpush(queue, b"\xff\xfe\x00binary garbage\x81")
    raw.lpush(queue, json.dumps(not_base64))
    raw.lpush(keys.control_queue("garbage"), "{not json")
    raw.lpush(queue, json.dumps({"body": 5}))
    # A well-formed message for a task that has no record: forged, dropped unrun.
    server = VirtualServer(redis.url, host="garbage", poll_interval=0.5)
    forged = str(uuid.uuid4())
    server.celery.send_task("vmtask.ping", kwargs={}, task_id=forged, queue=queue)
    ok(server.ping())
    ok(server.ping())
    assert worker.proc is not None and worker.proc.poll() is None
    assert "Dropped a message" in worker.log()
    assert "Unrecoverable error" not in worker.log()
    wait_until(lambda: f"{forged}: its record is MISSING" in worker.log(), 20, "forged drop")
    assert client.exists(keys.task_record(forged)) == 0


def test_stopping_one_of_two_workers_keeps_the_host_live(
        spawn: Callable[..., Any], tmp_path: Path) -> None:
    redis = spawn("redis")
    first = spawn("worker", redis_url=redis.url, host="duo", concurrency=1)
    spawn("worker", redis_url=redis.url, host="duo", concurrency=1)
    server = VirtualServer(redis.url, host="duo", poll_interval=0.5)
    absent: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        with VirtualServer(redis.url) as watcher:
            while not stop.is_set():
                if "duo" not in watcher.hosts:
                    absent.append(time.monotonic())
                time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        first.stop()
        ok(server.ping())  # served by the other worker, never HostUnavailableError
        time.sleep(1)
    finally:
        stop.set()
        watcher.join()
    assert absent == []
    # Many tasks over two workers of one host: each runs exactly once.
    spawn("worker", redis_url=redis.url, host="duo", concurrency=2)
    marker = tmp_path / "marks.txt"
    batch = [server.submit("tests.write_marker", description="m", cancelable=True,
                           kwargs={"path": str(marker)}) for _ in range(30)]
    for task in batch:
        ok(task)
    assert sorted(marker.read_text().split()) == sorted(t.id for t in batch)


def test_control_operations_do_not_wait_behind_long_work(spawn: Callable[..., Any]) -> None:
    redis = spawn("redis")
    worker = spawn("worker", redis_url=redis.url, host="busy", concurrency=1)
    server = VirtualServer(redis.url, host="busy", poll_interval=0.5)
    ok(server.create_dynamic_virtual_hard_disk("d.qcow2", 16))
    vm = server.create_virtual_machine("busy-vm", memory_mb=32)
    long = [server.ping(duration_ms=60_000, steps=60) for _ in range(4)]
    try:
        wait_until(lambda: long[0].snapshot().state == "STARTED", 20, "the long task to start")
        # Quick operations while the only long slot is busy and three wait behind it.
        disk = server.get_hard_disk("d.qcow2")
        assert disk.size_in_guest == 16 << 20
        ok(vm.delete())
        assert server.find_virtual_machine("busy-vm") is None
        states = [t.snapshot().state for t in long]
        assert states == ["STARTED", "PENDING", "PENDING", "PENDING"], states
    finally:
        for task in long:
            task.cancel()
    assert all(t.wait_for_completion(30_000) for t in long)
    assert [t.result for t in long] == [VMTaskResult.Cancelled] * 4
    assert worker.proc is not None and worker.proc.poll() is None


def test_a_frozen_redis_fails_fast_instead_of_hanging(spawn: Callable[..., Any]) -> None:
    redis = spawn("redis")
    spawn("worker", redis_url=redis.url, host="frozen", concurrency=1)
    env = {**os.environ, "VMTASK_REDIS_TIMEOUT_SECONDS": "1", "PYTHONPATH": str(REPO_ROOT)}
    assert redis.proc is not None
    os.kill(redis.proc.pid, signal.SIGSTOP)
    try:
        os.environ["VMTASK_REDIS_TIMEOUT_SECONDS"] = "1"
        try:
            server = VirtualServer(redis.url, host="frozen")
        finally:
            del os.environ["VMTASK_REDIS_TIMEOUT_SECONDS"]
        for call in (lambda: server.hosts, lambda: server.tasks(),
                     lambda: server.get_task("x"), lambda: list(server.vm_events(timeout_ms=10))):
            began = time.monotonic()
            with pytest.raises(errors.BrokerUnavailableError):
                call()
            assert time.monotonic() - began < 10
        began = time.monotonic()
        cli = subprocess.run([sys.executable, "-m", "api.cli", "--url", redis.url, "hosts"],
                             env=env, capture_output=True, text=True, timeout=60)
        assert cli.returncode == 3, cli.stderr
        assert time.monotonic() - began < 30
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)
