"""Flower against a real worker: basic auth, the worker list, a running task's state.

One password-protected redis-server (as in docker-compose.yml), one worker and
one ``celery -A workers flower`` process are shared by this module.  Flower gets
its credentials the way docker-compose.yml gives them: ``FLOWER_BASIC_AUTH``.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api import VirtualServer, VMTaskResult
from workers.devtools.sandbox import (
    RedisServer,
    WorkerProcess,
    free_port,
    stop_process_group,
    wait_until,
)

HOST = "flowerhost"
USER, PASSWORD = "ops", "flower-test-password"
REDIS_PASSWORD = "redis-test-password"
CELERY = Path(sys.executable).parent / "celery"


class Flower:
    def __init__(self, port: int, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.port = port
        self.proc = proc
        self.log_path = log_path

    def get(self, path: str, auth: tuple[str, str] | None = (USER, PASSWORD)) -> tuple[int, str]:
        """(HTTP status, body); status 0 when nothing answers."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as error:
            return int(error.code), error.read().decode(errors="replace")
        except OSError:
            return 0, ""

    def get_json(self, path: str) -> Any:
        status, body = self.get(path)
        assert status == 200, f"GET {path}: {status} {body[:300]}"
        return json.loads(body)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WorkerProcess, Flower]]:
    root = tmp_path_factory.mktemp("flower")
    redis_server = RedisServer(root / "redis", password=REDIS_PASSWORD).start()
    worker: WorkerProcess | None = None
    proc: subprocess.Popen[bytes] | None = None
    try:
        worker = WorkerProcess(redis_server.url, HOST, root / "storage", root).start()
        env = {k: v for k, v in worker.environment().items() if not k.startswith("FLOWER_")}
        env["FLOWER_BASIC_AUTH"] = f"{USER}:{PASSWORD}"
        port = free_port()
        log_path = root / "flower.log"
        with log_path.open("wb") as log:
            # cwd: Flower reads ./flowerconfig.py when there is one.
            proc = subprocess.Popen(
                [str(CELERY), "-A", "workers", "flower", f"--port={port}", "--address=127.0.0.1"],
                cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        flower = Flower(port, proc, log_path)

        def answering() -> bool:
            if flower.proc.poll() is not None:
                raise RuntimeError(f"flower exited early:\n{flower.log()}")
            return flower.get("/healthcheck", auth=None)[0] == 200

        wait_until(answering, 30, f"flower on port {port}", interval=0.1)
        yield worker, flower
    finally:
        if proc is not None:
            stop_process_group(proc)
        if worker is not None:
            worker.stop()
        redis_server.stop()


def test_flower_requires_basic_auth(cluster: tuple[WorkerProcess, Flower]) -> None:
    _, flower = cluster
    assert flower.get("/api/workers", auth=None)[0] == 401
    assert flower.get("/api/tasks", auth=(USER, "wrong"))[0] == 401
    assert flower.get("/", auth=None)[0] == 401
    assert flower.get("/api/tasks")[0] == 200
    # docker-compose.yml's healthcheck relies on this page needing no credentials.
    assert flower.get("/healthcheck", auth=None) == (200, "OK")
    cmdline = Path(f"/proc/{flower.proc.pid}/cmdline").read_bytes().decode()
    assert PASSWORD not in cmdline, "the credentials show in the process list"


def test_flower_lists_the_worker_and_its_host_queue(cluster: tuple[WorkerProcess, Flower]) -> None:
    worker, flower = cluster

    def listed() -> dict[str, Any] | None:
        # refresh=1 makes Flower ask the workers (inspect) instead of its cache.
        workers: dict[str, Any] = flower.get_json("/api/workers?refresh=1")
        for name, info in workers.items():
            if name.startswith(f"{HOST}-") and info.get("active_queues"):
                return dict(info)
        return None

    info = wait_until(listed, 20, "Flower to list the worker", interval=0.5)
    assert sorted(queue["name"] for queue in info["active_queues"]) == [
        f"host.{HOST}", f"host.{HOST}.control"]
    assert "vmtask.ping" in info["registered"]
    assert worker.proc is not None and info["stats"]["pid"] == worker.proc.pid


def test_flower_shows_a_running_task_its_arguments_and_progress(
    cluster: tuple[WorkerProcess, Flower],
) -> None:
    worker, flower = cluster
    seen: dict[str, Any] = {}
    with VirtualServer(worker.redis_url, host=HOST, poll_interval=0.5) as server:
        task = server.ping(duration_ms=8000, steps=80)
        try:

            def in_progress() -> bool:
                tasks = flower.get_json("/api/tasks")
                seen.clear()
                seen.update(tasks.get(task.id) or {})
                return seen.get("state") == "PROGRESS"

            try:
                wait_until(in_progress, 15, "Flower to show the task in PROGRESS", interval=0.2)
            except TimeoutError:
                pytest.fail(f"Flower never showed PROGRESS; it shows: {json.dumps(seen)}")
            assert seen["name"] == "vmtask.ping"
            # Celery sends arguments as reprs; they are readable, not a pickle.
            assert "'duration_ms': 8000" in seen["kwargs"] and "'steps': 80" in seen["kwargs"]
            assert seen["args"] == "()"
            assert seen["worker"].startswith(f"{HOST}-")
            assert seen["started"] is not None and seen["succeeded"] is None
            # The same through the per-task endpoint.
            info = flower.get_json(f"/api/task/info/{task.id}")
            assert info["name"] == "vmtask.ping" and info["uuid"] == task.id
            assert task.is_complete is False
        finally:
            task.cancel()
            assert task.wait_for_completion(10_000) is True
        assert task.result is VMTaskResult.Cancelled

        # Flower sees the end too: the runtime raises TaskFailed with plain strings.
        def finished() -> bool:
            seen.clear()
            seen.update(flower.get_json(f"/api/task/info/{task.id}"))
            return seen.get("state") in ("FAILURE", "REVOKED", "SUCCESS")

        wait_until(finished, 10, "Flower to see the task end", interval=0.2)
        assert seen["state"] == "FAILURE", seen
        assert "Cancelled" in (seen.get("exception") or ""), seen
