"""Flower against a real worker: basic auth, the worker list, a running task's state.

One password-protected redis-server (as in docker-compose.yml), one worker and
one ``celery -A workers flower`` process are shared by this module.  Flower gets
its credentials the way docker-compose.yml gives them: ``FLOWER_BASIC_AUTH``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from api import VirtualServer, VMHardDiskType, VMTask, VMTaskResult, errors
from api.protocol import hresults
from tests.flower_client import CELERY, PASSWORD, USER, Flower
from tests.helpers import assert_succeeded, pids_of, qemu_io
from workers.devtools.sandbox import (
    REPO_ROOT,
    RedisServer,
    WorkerProcess,
    free_port,
    stop_process_group,
    wait_until,
)

HOST = "flowerhost"
REDIS_PASSWORD = "redis-test-password"
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

        # Flower sees the end too: task.cancel() is a revocation, with no traceback.
        def finished() -> bool:
            seen.clear()
            seen.update(flower.get_json(f"/api/task/info/{task.id}"))
            return seen.get("state") in ("FAILURE", "REVOKED", "SUCCESS")

        wait_until(finished, 10, "Flower to see the task end", interval=0.2)
        assert seen["state"] == "REVOKED", seen
        assert seen["traceback"] is None, seen


# -- Celery, Flower and VMTask tell one truth --------------------------------------------



@pytest.fixture
def server(cluster: tuple[WorkerProcess, Flower]) -> Iterator[VirtualServer]:
    worker, _ = cluster
    with VirtualServer(worker.redis_url, host=HOST, poll_interval=0.5) as vs:
        yield vs


@pytest.fixture
def busy(server: VirtualServer) -> Iterator[list[VMTask]]:
    """Both of the worker's slots taken by long pings, so new tasks queue."""
    long = [server.ping(duration_ms=120_000, steps=120) for _ in range(2)]
    wait_until(lambda: all(t.snapshot().state == "STARTED" for t in long), 20, "busy slots")
    yield long
    for task in long:
        if not task.is_complete:
            task.cancel()
    for task in long:
        task.wait_for_completion(30_000)


def test_flower_revoke_of_a_queued_task_cancels_it(
        cluster: tuple[WorkerProcess, Flower], server: VirtualServer, busy: list[VMTask]) -> None:
    _, flower = cluster
    queued = server.ping(duration_ms=10)
    assert queued.snapshot().state == "PENDING"
    assert flower.post(f"/api/task/revoke/{queued.id}")[0] == 200
    assert queued.wait_for_completion(20_000)
    snap = queued.snapshot()
    assert (snap.result, snap.error) == (VMTaskResult.Cancelled, hresults.E_ABORT)
    wait_until(lambda: flower.state_of(queued.id) == "REVOKED", 20, "Flower to show REVOKED")
    assert server.celery.AsyncResult(queued.id).state == "REVOKED"


def test_flower_terminate_of_a_running_convert_is_a_clean_cancel(
        cluster: tuple[WorkerProcess, Flower], server: VirtualServer) -> None:
    worker, flower = cluster
    assert_succeeded(server.create_dynamic_virtual_hard_disk("t/src.qcow2", 512))
    qemu_io(worker.storage_root / "t" / "src.qcow2", "qcow2", "write -P 0x11 0 384M")
    task = server.get_hard_disk("t/src.qcow2").convert("t/out.vhd", VMHardDiskType.FixedSize)
    qemu_pids = wait_until(lambda: pids_of(f"vmtask-{task.id}"), 30, "the convert's qemu-img")
    for pid in qemu_pids:
        os.kill(pid, signal.SIGSTOP)  # hold it mid-write: the terminate surely finds it running
    try:
        assert flower.post(f"/api/task/revoke/{task.id}?terminate=true")[0] == 200
        assert task.wait_for_completion(30_000)
    finally:
        for pid in qemu_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert task.result is VMTaskResult.Cancelled
    assert sorted(p.name for p in (worker.storage_root / "t").iterdir()) == ["src.qcow2"]
    assert worker.proc is not None and worker.proc.poll() is None  # no pool child was killed
    wait_until(lambda: flower.state_of(task.id) == "REVOKED", 20, "Flower to show REVOKED")


def test_flower_terminate_of_a_running_merge_lets_it_finish(
        cluster: tuple[WorkerProcess, Flower], tmp_path: Path) -> None:
    worker, flower = cluster
    # The real qemu-img, behind a gate that holds a commit until the test opens it:
    # the terminate then surely meets the merge running.
    gate = tmp_path / "open"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "qemu-img"
    wrapper.write_text("#!/bin/sh\n"
                       f'if [ "$1" = commit ]; then\n'
                       f'  while [ ! -e "{gate}" ]; do sleep 0.05; done\n'
                       "fi\n"
                       f'exec {shutil.which("qemu-img")} "$@"\n')
    wrapper.chmod(0o755)
    gated = WorkerProcess(worker.redis_url, "gated", tmp_path / "g", tmp_path, concurrency=1,
                          env={"PATH": f"{bin_dir}:{os.environ['PATH']}"}).start()
    try:
        with VirtualServer(worker.redis_url, host="gated", poll_interval=0.5) as server:
            assert_succeeded(server.create_dynamic_virtual_hard_disk("base.qcow2", 64))
            assert_succeeded(server.create_differencing_virtual_hard_disk("top.qcow2",
                                                                          "base.qcow2"))
            qemu_io(tmp_path / "g" / "top.qcow2", "qcow2", "write -P 0x22 0 16M")
            task = server.get_hard_disk("top.qcow2").merge()
            wait_until(lambda: task.snapshot().state == "STARTED", 20, "the merge to start")
            assert flower.post(f"/api/task/revoke/{task.id}?terminate=true")[0] == 200
            wait_until(lambda: f"terminate of {task.id} is a cancel: NOT_CANCELABLE"
                       in gated.log(), 20, "the worker to refuse the terminate")
            assert not task.is_complete
            gate.touch()
            assert_succeeded(task)
            qemu_io(tmp_path / "g" / "base.qcow2", "qcow2", "read -P 0x22 0 16M")
            wait_until(lambda: flower.state_of(task.id) == "SUCCESS", 20, "SUCCESS in Flower")
    finally:
        gate.touch()
        gated.stop()


def test_a_killed_worker_shows_failure_in_flower(
        cluster: tuple[WorkerProcess, Flower], tmp_path: Path) -> None:
    worker, flower = cluster
    victim = WorkerProcess(worker.redis_url, "victim", tmp_path / "victim", tmp_path,
                           concurrency=1, env={"VMTASK_LEASE_SECONDS": "2"}).start()
    try:
        with VirtualServer(worker.redis_url, host="victim", poll_interval=0.5) as victims:
            task = victims.ping(duration_ms=60_000, steps=60)
            wait_until(lambda: flower.state_of(task.id) == "PROGRESS", 20, "PROGRESS in Flower")
            ran_on = flower.get_json(f"/api/task/info/{task.id}")["worker"]
            assert ran_on.startswith("victim-"), ran_on
            victim.kill()
            # The surviving worker's reaper judges the crash and tells Flower.
            wait_until(lambda: flower.state_of(task.id) == "FAILURE", 30, "FAILURE in Flower")
            info = flower.get_json(f"/api/task/info/{task.id}")
            assert "ThreadCrashError" in info["exception"] and "0x80010105" in info["exception"]
            # Attributed to the worker that ran the task, not to the reaper that judged.
            assert info["worker"] == ran_on, info
            assert task.result is VMTaskResult.ThreadCrashError
    finally:
        victim.stop()


def test_a_crash_judged_by_a_producer_is_attributed_to_the_worker_that_ran_it(
        cluster: tuple[WorkerProcess, Flower], tmp_path: Path) -> None:
    worker, flower = cluster
    victim = WorkerProcess(worker.redis_url, "victim2", tmp_path / "victim", tmp_path,
                           concurrency=1, env={"VMTASK_LEASE_SECONDS": "2"}).start()
    assert worker.proc is not None
    try:
        with VirtualServer(worker.redis_url, host="victim2", poll_interval=0.5) as victims:
            task = victims.ping(duration_ms=60_000, steps=60)
            wait_until(lambda: flower.state_of(task.id) == "PROGRESS", 20, "PROGRESS in Flower")
            ran_on = flower.get_json(f"/api/task/info/{task.id}")["worker"]
            # Only the producer can judge: the module's worker (whose reaper would)
            # is held still until the producer has.
            os.kill(worker.proc.pid, signal.SIGSTOP)
            try:
                victim.kill()
                wait_until(lambda: task.is_complete, 30, "the producer to judge the crash",
                           interval=0.1)
            finally:
                os.kill(worker.proc.pid, signal.SIGCONT)
            assert task.result is VMTaskResult.ThreadCrashError
            wait_until(lambda: flower.state_of(task.id) == "FAILURE", 30, "FAILURE in Flower")
            info = flower.get_json(f"/api/task/info/{task.id}")
            assert info["worker"] == ran_on, info
    finally:
        victim.stop()


def test_celery_result_api_reads_the_record(server: VirtualServer) -> None:
    task = server.ping(duration_ms=3000, steps=30)
    seen: list[int] = []

    def progressing() -> bool:
        result = server.celery.AsyncResult(task.id)
        if result.state == "PROGRESS":
            assert set(result.info) >= {"percent", "description"}
            assert result.info["description"] == task.description
            seen.append(int(result.info["percent"]))
        return len(set(seen)) >= 3

    wait_until(progressing, 20, "AsyncResult to report rising PROGRESS", interval=0.05)
    assert seen == sorted(seen) and seen[0] < seen[-1]
    assert task.wait_for_completion(30_000)
    done = server.celery.AsyncResult(task.id)
    assert (done.state, done.result) == ("SUCCESS", {"steps": 30})
    assert done.get(timeout=5) == {"steps": 30}

    assert_succeeded(server.create_dynamic_virtual_hard_disk("r/exists.qcow2", 1))
    failed = server.create_dynamic_virtual_hard_disk("r/exists.qcow2", 1)
    assert failed.wait_for_completion(30_000)
    result = server.celery.AsyncResult(failed.id)
    assert result.state == "FAILURE"
    assert isinstance(result.result, errors.TaskFailedError)
    assert result.result.args == ("DiskRelatedError", "0x80070050", failed.error_description)
    assert result.result.hresult == failed.error == 0x80070050


def test_celery_result_command_of_the_workers_app(
        cluster: tuple[WorkerProcess, Flower], server: VirtualServer) -> None:
    worker, _ = cluster
    task = server.ping(steps=1)
    assert_succeeded(task)
    shown = subprocess.run([str(CELERY), "-A", "workers", "result", task.id],
                           env=worker.environment(), capture_output=True, text=True,
                           timeout=60, check=False)
    assert shown.returncode == 0, shown.stderr
    assert "'steps': 1" in shown.stdout


def test_flower_lists_each_worker_under_a_name_that_carries_its_host(
        cluster: tuple[WorkerProcess, Flower], tmp_path: Path) -> None:
    worker, flower = cluster
    # Started exactly as the Flower page's recipe does: no -n.
    plain = WorkerProcess(worker.redis_url, "named", tmp_path / "named", tmp_path,
                          concurrency=1, node_name=None).start()
    try:
        expected = f"named@{socket.gethostname()}"
        # The worker, and its control lane named after it (the lane starts a moment later).
        wait_until(lambda: {expected, f"control-{expected}"}
                   <= set(flower.get_json("/api/workers?refresh=1")), 60,
                   "Flower to list the worker and its lane by their host")
    finally:
        plain.stop()


def test_queued_tasks_show_in_flower_with_their_progress_fields(
        cluster: tuple[WorkerProcess, Flower], server: VirtualServer, busy: list[VMTask]) -> None:
    _, flower = cluster
    queued = server.ping(duration_ms=10)
    wait_until(lambda: flower.state_of(queued.id) == "PENDING", 20, "a queued task in Flower")
    queued.cancel()
    wait_until(lambda: flower.state_of(busy[0].id) == "PROGRESS", 20, "PROGRESS in Flower")
    info = flower.get_json(f"/api/task/info/{busy[0].id}")
    meta = json.loads(info["result"])
    assert set(meta) == {"percent", "description"} and meta["description"] == busy[0].description


# -- Percent and description as Flower fields and columns (workers.flower_ext) ----------

PROGRESS_COLUMNS = ("percent", "description")


def test_the_private_flower_and_celery_names_vmtask_extends_still_exist() -> None:
    """workers.flower_ext patches two private names; an upgrade that renames them
    fails here first, with this message, rather than silently hiding progress."""
    from celery.events.state import Task
    from flower.views import tasks as flower_tasks

    assert isinstance(Task._fields, tuple) and "result" in Task._fields, (
        "celery.events.state.Task._fields changed: Flower's task API lists it")
    assert isinstance(flower_tasks.TASK_COLUMNS, dict) and "state" in flower_tasks.TASK_COLUMNS, (
        "flower.views.tasks.TASK_COLUMNS changed: the tasks page's columns come from it")


def _progressing(flower: Flower, task: VMTask) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def shown() -> bool:
        status, body = flower.get(f"/api/task/info/{task.id}")
        if status != 200:  # 404 until Flower has the task's first event
            return False
        seen.clear()
        seen.update(json.loads(body))
        return isinstance(seen.get("percent"), int) and seen["percent"] > 0

    try:
        wait_until(shown, 20, "Flower's task API to show a percent", interval=0.2)
    except TimeoutError:
        pytest.fail(f"Flower's /api/task/info never showed a percent: {json.dumps(seen)}")
    return seen


def _tasks_page_rows(flower: Flower) -> dict[str, dict[str, Any]]:
    """The rows the tasks page's table asks for (its datatable endpoint), by uuid."""
    query = ("draw=1&start=0&length=100&search%5Bvalue%5D=&order%5B0%5D%5Bcolumn%5D=0"
             "&order%5B0%5D%5Bdir%5D=desc&columns%5B0%5D%5Bdata%5D=received")
    rows = flower.get_json(f"/tasks/datatable?{query}")["data"]
    return {row["uuid"]: row for row in rows}


def test_flower_shows_percent_and_description_in_its_api_and_tasks_page(
        cluster: tuple[WorkerProcess, Flower], server: VirtualServer) -> None:
    """Started as the Flower page's first recipe (no --conf): the app extends Flower."""
    _, flower = cluster
    task = server.ping(duration_ms=8000, steps=80)
    try:
        info = _progressing(flower, task)
        assert info["description"] == task.description
        assert 0 < info["percent"] <= task.percent_completed < 100
        listed = flower.get_json("/api/tasks")[task.id]
        assert listed["description"] == task.description and listed["percent"] > 0
        status, page = flower.get("/tasks")
        assert status == 200
        headers = re.findall(r'<th data-column="([a-z_]+)">([^<]*)</th>', page)
        assert [name for name, _ in headers][:5] == [
            "name", "uuid", "state", "percent", "description"], headers
        row = _tasks_page_rows(flower)[task.id]
        assert row["description"] == task.description and row["percent"] > 0
    finally:
        with contextlib.suppress(errors.TaskNotCancelableError):
            task.cancel()
        task.wait_for_completion(10_000)
    # Celery's task-succeeded carries no percent; Flower shows the record's 100.
    done = server.ping(duration_ms=1500, steps=3)
    assert_succeeded(done)
    wait_until(lambda: flower.state_of(done.id) == "SUCCESS", 20, "SUCCESS in Flower")
    info = flower.get_json(f"/api/task/info/{done.id}")
    assert (info["percent"], info["description"]) == (100, done.description), info
    # A task that fails before any progress event still shows its description.
    assert_succeeded(server.create_dynamic_virtual_hard_disk("fl/exists.qcow2", 1))
    failed = server.create_dynamic_virtual_hard_disk("fl/exists.qcow2", 1)
    assert failed.wait_for_completion(30_000) and failed.result is not VMTaskResult.Success
    wait_until(lambda: flower.state_of(failed.id) == "FAILURE", 20, "FAILURE in Flower")
    assert flower.get_json(f"/api/task/info/{failed.id}")["description"] == failed.description


def _tasks_page(flower: Flower) -> str | None:
    if flower.proc.poll() is not None:
        raise RuntimeError(f"flower exited early:\n{flower.log()}")
    status, body = flower.get("/tasks")
    return body if status == 200 else None


def test_flower_with_the_compose_config_shows_the_progress_columns(
        cluster: tuple[WorkerProcess, Flower], tmp_path: Path) -> None:
    """Started as compose starts it: --conf=deploy/flower/flowerconfig.py, the
    credentials in a file; FLOWER_TASKS_COLUMNS still chooses other columns."""
    worker, _ = cluster
    secret = tmp_path / "flower_basic_auth"
    secret.write_text(f"{USER}:{PASSWORD}\n")
    conf = REPO_ROOT / "deploy" / "flower" / "flowerconfig.py"
    env = {k: v for k, v in worker.environment().items() if not k.startswith("FLOWER_")}
    env["FLOWER_BASIC_AUTH_FILE"] = str(secret)
    for columns, expected in ((None, ["name", "uuid", "state", "percent", "description"]),
                              ("name,percent", ["name", "percent"])):
        if columns is not None:
            env["FLOWER_TASKS_COLUMNS"] = columns
        port = free_port()
        log_path = tmp_path / f"flower-{port}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [str(CELERY), "-A", "workers", "flower", f"--conf={conf}", f"--port={port}",
                 "--address=127.0.0.1"],
                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        try:
            body = wait_until(partial(_tasks_page, Flower(port, proc, log_path)), 30,
                              f"flower --conf on port {port}", interval=0.1)
            shown = re.findall(r'<th data-column="([a-z_]+)">', body)
            assert shown[:len(expected)] == expected, shown
        finally:
            stop_process_group(proc)
