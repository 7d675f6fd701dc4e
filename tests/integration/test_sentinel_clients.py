"""The CLI and Flower given a Sentinel URL (issue 15): they follow the primary.

Real processes: a primary, a replica and three sentinels (`SentinelCluster`), a
worker, the ``vmtask`` CLI and ``celery -A workers flower``, all given the
``sentinel://`` URL.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api import VirtualServer
from tests.flower_client import CELERY, PASSWORD, USER, Flower
from workers.devtools.sandbox import (
    REPO_ROOT,
    SentinelCluster,
    WorkerProcess,
    free_port,
    stop_process_group,
    wait_until,
)

HOST = "hacli"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[SentinelCluster, WorkerProcess]]:
    cluster = SentinelCluster(tmp_path / "cluster").start()
    worker = WorkerProcess(cluster.url, HOST, tmp_path / "storage", tmp_path)
    try:
        worker.start()
        yield cluster, worker
    finally:
        worker.stop()
        cluster.stop()


def vmtask(url: str, *args: str) -> Any:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-m", "api.cli", "--url", url, *args, "--json"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=REPO_ROOT,
                          stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


@pytest.mark.failover
def test_the_cli_follows_the_primary_through_a_failover(
        served: tuple[SentinelCluster, WorkerProcess]) -> None:
    cluster, worker = served
    with VirtualServer(cluster.url, host=HOST, poll_interval=0.2) as server:
        task = server.ping(duration_ms=50, steps=1)
        assert task.wait_for_completion(30_000)
    assert [row["host"] for row in vmtask(cluster.url, "hosts")] == [HOST]
    old = cluster.kill_primary()
    cluster.wait_failover(old.port)
    # A new process asks the sentinels: it reaches the promoted replica.
    rows = vmtask(cluster.url, "hosts")
    assert [row["host"] for row in rows] == [HOST]
    assert worker.proc is not None and rows[0]["pid"] == worker.proc.pid
    shown = vmtask(cluster.url, "task", "show", task.id)
    assert (shown["id"], shown["state"], shown["result"]) == (task.id, "SUCCESS", "Success")


def test_flower_lists_the_worker_through_sentinel(
        served: tuple[SentinelCluster, WorkerProcess], tmp_path: Path) -> None:
    cluster, worker = served
    env = {k: v for k, v in worker.environment().items() if not k.startswith("FLOWER_")}
    env["FLOWER_BASIC_AUTH"] = f"{USER}:{PASSWORD}"
    assert env["VMTASK_REDIS_URL"] == cluster.url
    port = free_port()
    log_path = tmp_path / "flower.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(CELERY), "-A", "workers", "flower", f"--port={port}", "--address=127.0.0.1"],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    flower = Flower(port, proc, log_path)
    try:
        def listed() -> dict[str, Any] | None:
            if proc.poll() is not None:
                raise AssertionError(f"flower exited:\n{flower.log()}")
            status, body = flower.get("/api/workers?refresh=1")
            if status != 200:
                return None
            for name, info in json.loads(body).items():
                if name.startswith(f"{HOST}-") and info.get("active_queues"):
                    return dict(info)
            return None

        info = wait_until(listed, 60, "Flower to list the worker", interval=0.5)
        assert sorted(queue["name"] for queue in info["active_queues"]) == [
            f"host.{HOST}", f"host.{HOST}.control"]
        assert worker.proc is not None and info["stats"]["pid"] == worker.proc.pid
        assert info["stats"]["broker"]["transport"] == "sentinel"
    finally:
        stop_process_group(proc)


def run_cli(url: str | None, *args: str, **env_extra: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), **env_extra}
    if url is not None:
        env["VMTASK_REDIS_URL"] = url
    return subprocess.run([sys.executable, "-m", "api.cli", *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=REPO_ROOT,
                          stdin=subprocess.DEVNULL, check=False)


def test_the_cli_takes_the_master_name_from_the_environment_as_compose_sets_it(
        served: tuple[SentinelCluster, WorkerProcess]) -> None:
    """docker-compose.yml's HA producers: a sentinel:// URL without ?master_name=,
    and VMTASK_REDIS_SENTINEL_MASTER (issue 20, item 6)."""
    cluster, _worker = served
    bare = ";".join(f"sentinel://127.0.0.1:{port}" for port in cluster.sentinel_ports)
    done = run_cli(bare, "hosts", "--json", VMTASK_REDIS_SENTINEL_MASTER=cluster.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [row["host"] for row in json.loads(done.stdout)] == [HOST]
    # The same through --url, and a ping that runs on the worker.
    done = run_cli(None, "--url", bare, "--host", HOST, "ping",
                   VMTASK_REDIS_SENTINEL_MASTER=cluster.name)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_refused_url_prints_its_hresult_once() -> None:
    bare = "sentinel://127.0.0.1:1;sentinel://127.0.0.1:2"
    for done in (run_cli(bare, "hosts"), run_cli(None, "--url", bare, "hosts")):
        assert done.returncode == 2, done.stdout + done.stderr
        assert "master name" in done.stderr
        assert done.stderr.count("0x80070057") == 1, done.stderr
