"""`vmtask exporter`: Prometheus metrics read from Redis, checked against the records.

A real redis-server, a real worker, and the exporter as the CLI runs it (its own
process, scraped over HTTP); the round-trip bound with the collector in-process.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from api import VirtualServer, VMTaskResult
from api.enums import VMVMState
from api.exporter import BUCKETS, registry_for
from api.protocol import keys, records
from api.protocol.records import TaskSnapshot
from api.scripts import Scripts
from api.store import connect
from tests.helpers import wire_counter
from workers.devtools.sandbox import (
    REPO_ROOT,
    RedisServer,
    free_port,
    stop_process_group,
    wait_until,
)

HOST = "metrics"
DASHBOARDS = REPO_ROOT / "deploy" / "grafana"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> tuple[Samples, set[str]]:
    """Every sample by (name, sorted labels), and the names of the families declared."""
    samples: Samples = {}
    declared: set[str] = set()
    for family in text_string_to_metric_families(text):
        declared.add(family.name)
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples, declared


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@contextmanager
def exporter_process(redis_url: str, log: Path,
                     env: dict[str, str] | None = None) -> Iterator[Callable[[], str]]:
    """``vmtask exporter`` as an operator starts it; yields a scrape of its /metrics."""
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("VMTASK_")}
    environment.update({"VMTASK_REDIS_URL": redis_url, "PYTHONPATH": str(REPO_ROOT),
                        "VMTASK_REDIS_TIMEOUT_SECONDS": "2", **(env or {})})
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "api.cli", "exporter", "--listen",
                                 f"127.0.0.1:{port}"], cwd=REPO_ROOT, env=environment,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert reply.status == 200
            return str(reply.read().decode())

    def listening() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the exporter exited:\n{log.read_text(errors='replace')}")
        try:
            scrape()
            return True
        except OSError:
            return False

    try:
        wait_until(listening, 30, "the exporter to answer", interval=0.2)
        yield scrape
    finally:
        stop_process_group(proc)


def expected_from_records(snaps: list[TaskSnapshot]) -> tuple[
        dict[tuple[str, str, str], int], dict[str, dict[str, list[float]]]]:
    """What the metrics must say, computed from the task records themselves."""
    totals: dict[tuple[str, str, str], int] = {}
    observed: dict[str, dict[str, list[float]]] = {"duration": {}, "wait": {}}
    for snap in snaps:
        assert snap.result is not None and snap.finished is not None
        labels = (snap.name, snap.host, snap.result.name)
        totals[labels] = totals.get(labels, 0) + 1
        if snap.started is not None:
            observed["duration"].setdefault(snap.name, []).append(snap.finished - snap.started)
            observed["wait"].setdefault(snap.name, []).append(
                max(0.0, snap.started - snap.created))
    return totals, observed


def check_against_records(samples: Samples, snaps: list[TaskSnapshot]) -> None:
    totals, observed = expected_from_records(snaps)
    exported = {(dict(labels)["operation"], dict(labels)["host"], dict(labels)["result"]): v
                for (name, labels), v in samples.items() if name == "vmtask_tasks_total"}
    assert exported == totals
    for kind, family in (("duration", "vmtask_task_duration_seconds"),
                         ("wait", "vmtask_task_queue_wait_seconds")):
        exported_ops = {dict(labels)["operation"] for (name, labels) in samples
                        if name == f"{family}_count"}
        assert exported_ops == set(observed[kind]), kind
        for operation, seconds in observed[kind].items():
            labels = {"operation": operation, "host": HOST}
            assert value(samples, f"{family}_count", **labels) == len(seconds)
            assert value(samples, f"{family}_sum", **labels) == pytest.approx(
                sum(seconds), abs=1e-5 * len(seconds) + 1e-9)
            for bound in (*BUCKETS, math.inf):
                le = "+Inf" if bound == math.inf else repr(float(bound))
                assert value(samples, f"{family}_bucket", le=le, **labels) == \
                    sum(1 for s in seconds if s <= bound), (kind, operation, le)


@pytest.mark.slow
def test_metrics_match_the_records_after_success_failure_cancel_and_a_killed_worker(
        spawn: Callable[..., Any], tmp_path: Path) -> None:
    redis_server = spawn("redis")
    worker = spawn("worker", redis_url=redis_server.url, host=HOST, concurrency=1,
                   env={"VMTASK_LEASE_SECONDS": "3", "VMTASK_HEARTBEAT_SECONDS": "3"})
    server = VirtualServer(redis_server.url, host=HOST, poll_interval=0.5)
    vm = server.create_virtual_machine("metricsvm", memory_mb=64)
    with exporter_process(redis_server.url, tmp_path / "exporter.log") as scrape:
        samples, _ = parse(scrape())
        assert value(samples, "vmtask_up") == 1
        assert value(samples, "vmtask_host_up", host=HOST) == 1
        assert value(samples, "vmtask_host_maintenance", host=HOST) == 0
        server.set_maintenance(HOST, True)
        assert value(parse(scrape())[0], "vmtask_host_maintenance", host=HOST) == 1
        server.set_maintenance(HOST, False)
        assert value(samples, "vmtask_vms", host=HOST, state="TurnedOff") == 1
        free = value(samples, "vmtask_storage_free_bytes", host=HOST)
        assert abs(free - shutil.disk_usage(worker.storage_root).free) < 512 * 2**20

        done = [server.ping(duration_ms=300, steps=3)]
        assert done[0].wait_for_completion(30_000)
        assert done[0].result is VMTaskResult.Success
        failed = server.submit("tests.fail", description="fails", cancelable=False,
                               kwargs={"kind": "illegal"})
        assert failed.wait_for_completion(30_000)
        assert failed.result is VMTaskResult.IllegalValueError
        done.append(failed)

        # One slot: the long task runs, the next waits in the queue, then both cancelled.
        running = server.ping(duration_ms=60_000, steps=60)
        wait_until(lambda: running.snapshot().state == records.STARTED, 30, "the long ping")
        queued = server.ping(duration_ms=100)
        samples, _ = parse(scrape())
        assert value(samples, "vmtask_tasks_running", host=HOST) == 1
        assert value(samples, "vmtask_queue_length", host=HOST, lane="long") == 1
        assert value(samples, "vmtask_queue_length", host=HOST, lane="control") == 0
        queued.cancel()
        running.cancel()
        for task in (queued, running):
            assert task.wait_for_completion(30_000)
            assert task.result is VMTaskResult.Cancelled
        assert queued.snapshot().started is None  # cancelled in the queue: no duration
        done += [queued, running]

        # kill -9 mid-task: judged ThreadCrashError once its lease lapses.
        doomed = server.ping(duration_ms=60_000, steps=60)
        wait_until(lambda: doomed.snapshot().state == records.STARTED, 30, "the doomed ping")
        worker.kill()
        samples, _ = parse(scrape())
        assert value(samples, "vmtask_tasks_running", host=HOST) == 1  # not judged yet
        assert doomed.wait_for_completion(60_000)
        assert doomed.result is VMTaskResult.ThreadCrashError
        done.append(doomed)

        def host_down() -> bool:
            found, _ = parse(scrape())
            return value(found, "vmtask_host_up", host=HOST) == 0

        wait_until(host_down, 30, "the dead host's heartbeat to lapse")
        samples, _ = parse(scrape())
        check_against_records(samples, [task.snapshot() for task in done])
        assert value(samples, "vmtask_tasks_running", host=HOST) == 0
        # As VirtualMachine.state reads it while its host is down.
        assert vm.state is VMVMState.Invalid
        assert value(samples, "vmtask_vms", host=HOST, state="Invalid") == 1
        assert value(samples, "vmtask_vms", host=HOST, state="TurnedOff") == 0
        assert ("vmtask_storage_free_bytes", (("host", HOST),)) not in samples
    server.close()


# -- without a worker: records ended by the real scripts ----------------------------


def end_tasks(client: Any, count: int, *, host: str = HOST, start_index: int = 0,
              operation: str = "vmtask.ping") -> None:
    """``count`` tasks through the real start and finish scripts, pipelined."""
    scripts = Scripts.of(client)
    start, finish = scripts.task_start, scripts.task_finish
    now = time.time()
    # Loaded once, so the pipelines' EVALSHA finds them.
    client.script_load(start.script)
    client.script_load(finish.script)
    for first in range(0, count, 2000):
        pipe = client.pipeline(transaction=False)
        for index in range(start_index + first, start_index + min(first + 2000, count)):
            task_id = f"00000000-0000-4000-8000-{index:012d}"
            record, lease = keys.task_record(task_id), keys.task_lease(task_id)
            pipe.hset(record, mapping={"name": operation, "host": host, "state": "PENDING",
                                       "created": repr(now - 3), "cancelable": "1",
                                       "percent": "0", "description": "seeded"})
            pipe.zadd(keys.RECENT_TASKS, {task_id: now - 3})
            start.queue(pipe, record=record, lease=lease, running=keys.RUNNING_TASKS,
                        now=repr(now - 2.5), worker="w:m:1", lease_ms=60_000,
                        task_id=task_id, node="n")
            finish.queue(pipe, record=record, lease=lease, running=keys.RUNNING_TASKS,
                         channel=keys.task_channel(task_id), state=records.SUCCESS, result=0,
                         error=0, description="", finished=repr(now - 2.5 + (index % 7)),
                         percent=100, retention=86400, task_id=task_id,
                         only_if_lease_expired="0", output="")
        pipe.execute()


def seed_host(client: Any, host: str = HOST) -> None:
    client.sadd(keys.KNOWN_HOSTS, host)
    client.set(keys.host_heartbeat(host), json.dumps({"host": host,
                                                      "storage_free_bytes": 12345}), ex=600)
    client.lpush(keys.host_queue(host), "m1", "m2")
    client.hset(keys.vm_record("seeded-vm"), mapping={"name": "seeded-vm", "host": host,
                                                       "state": str(int(VMVMState.Running))})
    client.sadd(keys.VM_NAMES, "seeded-vm")


def test_a_scrape_takes_the_same_round_trips_whatever_the_history(
        spawn: Callable[..., Any]) -> None:
    redis_server = spawn("redis")
    client = connect(redis_server.url)
    seed_host(client)
    registry = registry_for(client)
    rounds: list[int] = []
    ended = 0
    for history in (10, 5000):
        end_tasks(client, history - ended, start_index=ended)
        ended = history
        with wire_counter() as wire:
            samples, _ = parse(generate_latest(registry).decode())
        assert value(samples, "vmtask_up") == 1
        assert value(samples, "vmtask_tasks_total", operation="vmtask.ping", host=HOST,
                     result="Success") == history
        assert value(samples, "vmtask_task_duration_seconds_count", operation="vmtask.ping",
                     host=HOST) == history
        rounds.append(wire["<sends>"])
        # The metrics hash and the hosts in maintenance; the one VM.
        assert wire["HGETALL"] == 2 and wire["HMGET"] == 1
    assert rounds == [2, 2], rounds


def test_a_scrape_during_a_redis_restart_says_so_and_the_next_works(
        spawn: Callable[..., Any], tmp_path: Path) -> None:
    redis_server: RedisServer = spawn("redis", appendonly=True)
    client = connect(redis_server.url)
    seed_host(client)
    end_tasks(client, 3)
    log = tmp_path / "exporter.log"
    with exporter_process(redis_server.url, log) as scrape:
        samples, _ = parse(scrape())
        assert value(samples, "vmtask_up") == 1
        assert value(samples, "vmtask_tasks_total", operation="vmtask.ping", host=HOST,
                     result="Success") == 3
        redis_server.stop()
        samples, _ = parse(scrape())
        assert value(samples, "vmtask_up") == 0
        assert ("vmtask_tasks_total", (("host", HOST), ("operation", "vmtask.ping"),
                                       ("result", "Success"))) not in samples
        assert "Scrape failed: cannot read" in log.read_text()
        redis_server.start()
        samples, _ = parse(scrape())  # the very next scrape, no wait
        assert value(samples, "vmtask_up") == 1
        assert value(samples, "vmtask_tasks_total", operation="vmtask.ping", host=HOST,
                     result="Success") == 3  # kept in Redis (AOF), not in the exporter
        assert value(samples, "vmtask_queue_length", host=HOST, lane="long") == 2


def test_every_metric_the_dashboard_uses_is_exported(spawn: Callable[..., Any]) -> None:
    redis_server = spawn("redis")
    client = connect(redis_server.url)
    seed_host(client)
    end_tasks(client, 2)
    samples, declared = parse(generate_latest(registry_for(client)).decode())
    names = {name for name, _ in samples} | declared
    dashboards = sorted(DASHBOARDS.glob("*.json"))
    assert dashboards, "no dashboard in deploy/grafana"
    for path in dashboards:
        dashboard = json.loads(path.read_text())
        exprs = [target["expr"] for panel in dashboard["panels"]
                 for target in panel.get("targets", [])]
        assert exprs, path
        used = {name for expr in exprs for name in re.findall(r"\bvmtask_[a-z_]+", expr)}
        assert used, path
        assert used <= names, f"{path.name} uses {sorted(used - names)}, not exported"
        # Every family the issue asks for has a panel.
        for family in ("vmtask_tasks_total", "vmtask_task_duration_seconds_bucket",
                       "vmtask_task_queue_wait_seconds_bucket", "vmtask_tasks_running",
                       "vmtask_queue_length", "vmtask_host_up", "vmtask_host_maintenance",
                       "vmtask_vms", "vmtask_storage_free_bytes",
                       "vmtask_backup_last_success_timestamp"):
            assert family in used, f"{path.name} has no panel for {family}"


@pytest.mark.slow
@pytest.mark.failover
def test_a_sentinel_failover_between_scrapes_the_exporter_follows_the_new_primary(
        tmp_path: Path) -> None:
    from workers.devtools.sandbox import SentinelCluster

    cluster = SentinelCluster(tmp_path / "cluster").start()
    try:
        client = connect(cluster.url)
        seed_host(client)
        end_tasks(client, 4)
        assert client.execute_command("WAIT", 1, 5000) == 1  # the replica has the counts
        log = tmp_path / "exporter.log"
        with exporter_process(cluster.url, log) as scrape:
            samples, _ = parse(scrape())
            assert value(samples, "vmtask_up") == 1
            old_port = cluster.primary().port
            cluster.kill_primary()
            began = time.monotonic()
            samples, _ = parse(scrape())  # the sentinels still name the dead primary
            assert value(samples, "vmtask_up") == 0
            assert time.monotonic() - began < 10, "a failing scrape must not hang"
            assert "Scrape failed: cannot read" in log.read_text()
            cluster.wait_failover(old_port)
            samples, _ = parse(scrape())
            assert value(samples, "vmtask_up") == 1
            assert value(samples, "vmtask_tasks_total", operation="vmtask.ping", host=HOST,
                         result="Success") == 4
    finally:
        cluster.stop()


def test_a_submit_withdrawn_after_a_failover_is_counted_cancelled_without_a_duration(
        spawn: Callable[..., Any]) -> None:
    from api import errors
    from api.store import TaskStore

    redis_server = spawn("redis")
    client = connect(redis_server.url)
    task_id = "00000000-0000-4000-8000-0000000000aa"
    client.hset(keys.task_record(task_id), mapping={
        "name": "vmtask.ping", "host": HOST, "state": records.PENDING,
        "created": repr(time.time()), "cancelable": "1", "percent": "0"})
    store = TaskStore(client, redis_server.url, 3600)
    with pytest.raises(errors.BrokerUnavailableError, match="withdrawn"):
        store.withdraw_unconfirmed(task_id, "vmtask.ping")
    samples, _ = parse(generate_latest(registry_for(client)).decode())
    snap = store.read(task_id)
    assert snap.result is VMTaskResult.Cancelled and snap.started is None
    check_against_records(samples, [snap])
    store.close()
