"""Redis high availability: a Sentinel failover is an event, not an outage.

Real processes on free ports: a primary, a replica and three
``redis-server --sentinel``; real celery workers and producers given the
``sentinel://`` URL.  The primary is killed with SIGKILL while work is in flight.
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from api import VirtualServer, VMHardDiskType, VMTask, VMTaskResult, errors
from api.protocol import keys
from api.protocol.tasks import TaskSpec
from tests.helpers import assert_succeeded as ok
from tests.helpers import pids_of, qemu_io
from workers.devtools.sandbox import SentinelCluster, WorkerProcess, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.failover]

ECHO = TaskSpec("tests.marked_echo", ("path", "value", "seconds"), cancelable=False)
HOSTS = ("ha1", "ha2")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[SentinelCluster]:
    started = SentinelCluster(tmp_path / "cluster").start()
    yield started
    started.stop()


def start_workers(cluster: SentinelCluster, tmp_path: Path,
                  concurrency: int = 4) -> list[WorkerProcess]:
    workers = [WorkerProcess(cluster.url, host, tmp_path / f"storage-{host}", tmp_path,
                             concurrency=concurrency) for host in HOSTS]
    for worker in workers:
        worker.start(wait=False)
    for worker in workers:
        worker.wait_ready()
    return workers


def test_200_tasks_across_a_failover_each_end_once_with_its_result(
        cluster: SentinelCluster, tmp_path: Path) -> None:
    workers = start_workers(cluster, tmp_path)
    marker = tmp_path / "runs.txt"
    server = VirtualServer(cluster.url, poll_interval=0.2)
    killed = threading.Event()
    submitter = threading.Thread(target=lambda: None)
    try:
        accepted: dict[str, tuple[VMTask, int]] = {}
        refused: list[int] = []
        latencies: list[float] = []
        # A wait that spans the failover.
        long = server.submit(ECHO, description="long", host="ha1",
                             kwargs={"path": str(marker), "value": -1, "seconds": 6.0})
        long_done: list[bool] = []
        waiter = threading.Thread(target=lambda: long_done.append(
            long.wait_for_completion(60_000)))
        waiter.start()

        def submit_all() -> None:
            for i in range(200):
                if i == 60:
                    killed.wait(10)
                begun = time.monotonic()
                try:
                    task = server.submit(ECHO, description=f"echo {i}", host=HOSTS[i % 2],
                                         kwargs={"path": str(marker), "value": i,
                                                 "seconds": 0.1})
                except errors.BrokerUnavailableError:
                    refused.append(i)
                else:
                    accepted[task.id] = (task, i)
                latencies.append(time.monotonic() - begun)

        submitter = threading.Thread(target=submit_all)
        submitter.start()
        wait_until(lambda: len(latencies) >= 60, 30, "60 submits")
        old = cluster.kill_primary()
        killed.set()
        cluster.wait_failover(old.port)
        submitter.join(120)
        assert not submitter.is_alive()
        # Both hosts stay live through and after the switch.
        for _ in range(3):
            assert sorted(server.hosts) == sorted(HOSTS)
            time.sleep(0.5)

        primary = cluster.primary().client()

        def where(task_id: str) -> str:
            unacked = primary.hgetall("unacked")
            logged = [line for worker in workers for line in worker.log().splitlines()
                      if task_id in line]
            return (f"record {primary.hgetall(keys.task_record(task_id))}; queued "
                    f"{[primary.llen(keys.host_queue(h)) for h in HOSTS]}; unacked "
                    f"{[k for k, v in unacked.items() if task_id in v]} of {len(unacked)}; "
                    f"worker log: {logged}")

        # Every task submit returned for ends with its own result, exactly once.
        unfinished: dict[str, str] = {}
        for task, value in accepted.values():
            if not task.wait_for_completion(60_000):
                unfinished[task.id] = f"task {value} did not end: {where(task.id)}"
                continue
            snap = task.snapshot()
            if snap.result is not VMTaskResult.Success:
                unfinished[task.id] = f"task {value} ended {snap.result}: {where(task.id)}"
                continue
            assert snap.output == {"value": value}
        assert not unfinished, "; ".join(unfinished.values())
        waiter.join(60)
        assert long_done == [True]
        assert long.snapshot().result is VMTaskResult.Success

        def assert_each_ran_once() -> None:
            runs = collections.Counter(marker.read_text().split())
            assert set(runs) == {*accepted, long.id}  # and a refused submit never ran
            assert all(count == 1 for count in runs.values()), runs

        assert_each_ran_once()
        for task_id in [*accepted, long.id]:
            assert primary.hget(keys.task_record(task_id), "runs") == "1"
        assert len(accepted) + len(refused) == 200
        assert len(accepted) >= 190, f"{len(refused)} of 200 submits refused"
        print(f"\nsubmits refused: {len(refused)}; max submit latency "
              f"{max(latencies) * 1000:.0f} ms")

        # The old primary returns as a replica: nothing is left to run again.
        cluster.restart_as_replica(old)
        # A stale copy (an ack the old primary took with it) may come back from
        # the unacked hash: the start gate drops it, so the queues drain.
        wait_until(lambda: sum(primary.llen(keys.host_queue(h)) for h in HOSTS) == 0, 20,
                   "the queues to drain")
        replica = old.client()
        wait_until(lambda: replica.dbsize() == primary.dbsize(), 20, "the replica to sync")
        assert replica.hget(keys.task_record(long.id), "runs") == "1"
        assert_each_ran_once()
        for worker in workers:
            assert "Unrecoverable error" not in worker.log()
    finally:
        killed.set()
        submitter.join(120)
        server.close()
        for worker in workers:
            worker.stop()


def test_a_convert_running_across_a_failover_completes_byte_exact(
        cluster: SentinelCluster, tmp_path: Path) -> None:
    worker = WorkerProcess(cluster.url, "ha1", tmp_path / "storage-ha1", tmp_path,
                           concurrency=2).start()
    server = VirtualServer(cluster.url, host="ha1", poll_interval=0.2)
    try:
        ok(server.create_dynamic_virtual_hard_disk("src.qcow2", 128))
        source = worker.storage_root / "src.qcow2"
        qemu_io(source, "qcow2", "write -P 0x5a 0 32M", "write -P 0xa5 96M 32M")
        task = server.get_hard_disk("src.qcow2").convert("out.vhd", VMHardDiskType.FixedSize)
        # Hold qemu-img still so the failover surely happens while the convert runs.
        qemu_pids = wait_until(lambda: pids_of(f"vmtask-{task.id}"), 30, "the convert")
        for pid in qemu_pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            assert task.snapshot().state == "STARTED"
            old = cluster.kill_primary()
            cluster.wait_failover(old.port)
        finally:
            for pid in qemu_pids:
                os.kill(pid, signal.SIGCONT)
        assert task.wait_for_completion(120_000)
        assert task.snapshot().result is VMTaskResult.Success, task.snapshot()
        assert cluster.primary().client().hget(keys.task_record(task.id), "runs") == "1"
        out = worker.storage_root / "out.vhd"
        import subprocess
        compared = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "vpc",
                                   str(source), str(out)], capture_output=True, text=True)
        assert compared.returncode == 0, compared.stdout + compared.stderr
        assert "ha1" in server.hosts
    finally:
        server.close()
        worker.stop()


def test_a_failover_longer_than_the_lease_judges_no_running_task_crashed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The crash bound counts from the end of the failover.

    The lease is 3 s and the sentinels take about 4.5 s to replace the primary
    (down-after 3 s), so the running task's lease has lapsed on the new primary
    before its worker can reach it.  The worker is held (SIGSTOP) until a producer
    has read the task there, started and lease-less (a read judges such a task),
    so the judgment is surely asked for: it must decline, and the worker, let go,
    takes its lease back and the task ends with its result, once.
    """
    short = {"VMTASK_LEASE_SECONDS": "3", "VMTASK_HEARTBEAT_SECONDS": "3"}
    for name, value in short.items():
        monkeypatch.setenv(name, value)
    cluster = SentinelCluster(tmp_path / "cluster", down_after_ms=3000).start()
    workers = [WorkerProcess(cluster.url, host, tmp_path / f"storage-{host}", tmp_path,
                             concurrency=2, env=short) for host in HOSTS]
    server = VirtualServer(cluster.url, poll_interval=0.2)
    marker = tmp_path / "runs.txt"
    try:
        for worker in workers:
            worker.start()
        task = server.submit(ECHO, description="spans the failover", host="ha1",
                             kwargs={"path": str(marker), "value": 7, "seconds": 12.0})
        wait_until(lambda: task.snapshot().state == "STARTED", 30, "the task to start")
        held = workers[0].proc
        assert held is not None
        old = cluster.kill_primary()
        killed = time.monotonic()
        os.killpg(held.pid, signal.SIGSTOP)
        try:
            cluster.wait_failover(old.port)
            took = time.monotonic() - killed
            assert took > 3, f"the failover ({took:.1f} s) must outlast the lease"
            primary = cluster.primary().client()
            assert not primary.exists(keys.task_lease(task.id)), "the lease did not lapse"
            snap = task.snapshot()  # judges a started task whose lease lapsed: declines
            assert (snap.state, snap.lease_alive) == ("STARTED", False), snap
        finally:
            os.killpg(held.pid, signal.SIGCONT)
        assert task.wait_for_completion(60_000)
        snap = task.snapshot()
        assert snap.result is VMTaskResult.Success, snap
        assert snap.output == {"value": 7}
        assert marker.read_text().split() == [task.id]
        assert cluster.primary().client().hget(keys.task_record(task.id), "runs") == "1"
        for worker in workers:
            assert "ThreadCrashError" not in worker.log()
        wait_until(lambda: sorted(server.hosts) == sorted(HOSTS), 10, "both hosts live")
    finally:
        server.close()
        for worker in workers:
            worker.stop()
        cluster.stop()


def test_a_message_lost_in_the_switch_is_sent_again_and_runs_once(
        cluster: SentinelCluster, tmp_path: Path) -> None:
    """The window kombu's BRPOP leaves open: the dying primary's pop reached the
    replica, its reply never reached the worker.  The message is then on no queue,
    in no unacked hash and in no worker's hands; its record says PENDING.  After the
    switch a worker of the host finds that record and sends the message again."""
    worker = WorkerProcess(cluster.url, "ha1", tmp_path / "storage-ha1", tmp_path,
                           concurrency=1)
    server = VirtualServer(cluster.url, poll_interval=0.2)
    marker = tmp_path / "runs.txt"
    try:
        worker.start()
        busy = server.submit(ECHO, description="holds the only slot", host="ha1",
                             kwargs={"path": str(marker), "value": 1, "seconds": 8.0})
        wait_until(lambda: busy.snapshot().state == "STARTED", 30, "the busy task to start")
        lost = server.submit(ECHO, description="its message is lost", host="ha1",
                             kwargs={"path": str(marker), "value": 2, "seconds": 0.1})
        primary = cluster.primary().client()
        # The dying primary's last pop, made by hand: the message leaves the queue,
        # the replica has that, and no worker ever receives it.
        popped = primary.rpop(keys.host_queue("ha1"))
        assert popped is not None and lost.id in popped
        assert primary.execute_command("WAIT", 1, 5000) == 1
        old = cluster.kill_primary()
        cluster.wait_failover(old.port)
        assert lost.wait_for_completion(90_000), lost.snapshot()
        assert busy.wait_for_completion(30_000)
        for task, value in ((busy, 1), (lost, 2)):
            snap = task.snapshot()
            assert snap.result is VMTaskResult.Success, snap
            assert snap.output == {"value": value}
        assert sorted(marker.read_text().split()) == sorted([busy.id, lost.id])
        assert cluster.primary().client().hget(keys.task_record(lost.id), "runs") == "1"
        assert f"{lost.id} was PENDING with its message nowhere" in worker.log()
    finally:
        server.close()
        worker.stop()
