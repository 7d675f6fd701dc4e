"""The task system: IVMTask2 members, results and HRESULTs, cancel, crash, Redis loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from api import VirtualServer, VMHardDiskType, VMTaskResult, VMVMState, errors
from api.protocol import hresults, keys
from api.protocol.records import STARTED
from tests.helpers import wire_counter
from workers.devtools.sandbox import REPO_ROOT, RedisServer, WorkerProcess, wait_until


def wait_started(task: Any, timeout: float = 20) -> None:
    wait_until(lambda: task.snapshot().state == STARTED, timeout, f"task {task.id} to start")


# -- the enums and the error tree ------------------------------------------------


def test_enum_values_match_the_reference() -> None:
    assert [m.value for m in VMTaskResult] == list(range(9))
    assert VMTaskResult.ThreadCrashError == 8 and VMTaskResult.IllegalValueError == 7
    assert VMVMState.DeleteMachine == 10 and VMVMState.Running == 5 and VMVMState.Saving == 7
    assert (VMHardDiskType.Dynamic, VMHardDiskType.HostDrive) == (0, 3)


def test_every_error_derives_from_vmtaskerror_and_carries_an_hresult() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.VMTaskError)
        assert isinstance(cls("x").hresult, int)
    assert issubclass(errors.InvalidTimeoutError, ValueError)
    assert errors.InvalidTimeoutError("x").hresult == 0x80004003
    assert errors.InvalidArgumentError("x").hresult == 0x80070057


def test_api_imports_without_the_worker_package() -> None:
    code = "import sys, api; assert 'workers' not in sys.modules and 'qemu' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


# -- IVMTask2 members --------------------------------------------------------------


def test_a_successful_task_exposes_every_member(server: VirtualServer) -> None:
    task = server.ping(duration_ms=300, steps=3)
    assert isinstance(task.id, str) and len(task.id) == 36
    assert task.description == "Ping: 300 ms in 3 steps"
    assert task.is_cancelable is True
    assert task.wait_for_completion(20_000) is True
    snap = task.snapshot()
    assert (snap.is_complete, snap.result, snap.error, snap.error_description) == (
        True, VMTaskResult.Success, 0, "")
    assert task.percent_completed == 100
    assert task.is_complete and task.result is VMTaskResult.Success
    assert task.is_cancelable is False  # complete tasks cannot be cancelled
    with pytest.raises(errors.TaskNotCancelableError):
        task.cancel()


def test_result_is_none_until_complete(server: VirtualServer) -> None:
    task = server.ping(duration_ms=5000, steps=5)
    wait_started(task)
    snap = task.snapshot()
    assert snap.result is None and not snap.is_complete and snap.error == 0
    task.cancel()
    assert task.wait_for_completion(10_000)


def test_progress_is_monotonic_and_reaches_intermediate_values(server: VirtualServer) -> None:
    task = server.ping(duration_ms=1500, steps=10)
    seen: list[int] = []
    while not (snap := task.snapshot()).is_complete:
        seen.append(snap.percent_completed)
        time.sleep(0.01)
    seen.append(snap.percent_completed)
    assert seen == sorted(seen), seen
    assert any(0 < p < 100 for p in seen), seen
    assert seen[-1] == 100


def test_progress_writes_are_rate_limited(server: VirtualServer,
                                         redis_server: RedisServer) -> None:
    # Every progress write publishes one 'progress' message: count them.
    pubsub = redis_server.client().pubsub(ignore_subscribe_messages=True)
    task = server.submit("vmtask.ping", description="rate", cancelable=True,
                         kwargs={"duration_ms": 600, "steps": 300})
    pubsub.subscribe(keys.task_channel(task.id))
    published: list[str] = []
    deadline = time.monotonic() + 20
    while "done" not in published and time.monotonic() < deadline:
        # None also stands for the consumed subscribe confirmation: keep reading.
        if (message := pubsub.get_message(timeout=1)) is not None:
            published.append(message["data"])
    assert published[-1:] == ["done"], published
    # 300 updates in ~0.6 s with at most one write per 0.2 s.
    assert 0 < published.count("progress") <= 5, published


def test_an_unknown_task_id_raises(server: VirtualServer) -> None:
    with pytest.raises(errors.TaskNotFoundError):
        server.get_task("00000000-0000-4000-8000-000000000000")


def test_reattach_from_another_process(server: VirtualServer, redis_server: RedisServer) -> None:
    task = server.ping(duration_ms=500, steps=2)
    code = (
        "import json, sys\n"
        "from api import VirtualServer\n"
        "t = VirtualServer(sys.argv[1]).get_task(sys.argv[2])\n"
        "done = t.wait_for_completion(30000)\n"
        "s = t.snapshot()\n"
        "print(json.dumps([done, s.description, int(s.result), s.percent_completed]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, redis_server.url, task.id],
                         check=True, capture_output=True, text=True, cwd=REPO_ROOT)
    assert json.loads(out.stdout) == [True, "Ping: 500 ms in 2 steps", 0, 100]


# -- wait_for_completion -------------------------------------------------------------


@pytest.mark.parametrize("timeout", [-2, 4_000_001, -100, 10**12])
def test_wait_rejects_timeouts_outside_the_range(server: VirtualServer, timeout: int) -> None:
    task = server.ping()
    with pytest.raises(errors.InvalidTimeoutError) as caught:
        task.wait_for_completion(timeout)
    assert isinstance(caught.value, ValueError)
    assert caught.value.hresult == hresults.E_POINTER


@pytest.mark.parametrize("timeout", [1.5, "100", None, True])
def test_wait_rejects_non_integer_timeouts(server: VirtualServer, timeout: Any) -> None:
    with pytest.raises(errors.InvalidTimeoutError):
        server.ping().wait_for_completion(timeout)


def test_wait_zero_checks_and_returns_at_once(server: VirtualServer) -> None:
    task = server.ping(duration_ms=3000, steps=3)
    assert task.wait_for_completion(0) is False
    task.cancel()
    assert task.wait_for_completion(4_000_000) is True
    assert task.wait_for_completion(0) is True


def test_wait_returns_false_on_timeout(server: VirtualServer) -> None:
    task = server.ping(duration_ms=5000, steps=1)
    started = time.monotonic()
    assert task.wait_for_completion(300) is False
    assert time.monotonic() - started >= 0.3
    task.cancel()
    assert task.wait_for_completion(-1) is True


def test_wait_is_woken_by_pubsub_not_by_polling(server: VirtualServer) -> None:
    task = server.ping(duration_ms=300)
    task.poll_interval = 60.0  # polling alone could not finish within the wait
    assert task.wait_for_completion(20_000) is True


def test_wait_polls_when_the_completion_message_is_lost(
    server: VirtualServer, redis_server: RedisServer
) -> None:
    task = server.ping(duration_ms=3000, steps=1)
    wait_started(task)
    task.poll_interval = 0.2
    outcome: list[bool] = []
    waiter = threading.Thread(target=lambda: outcome.append(task.wait_for_completion(2500)))
    waiter.start()
    # Complete the record without a 'done' message, as if the message were lost.
    redis_server.client().hset(keys.task_record(task.id), mapping={"state": "SUCCESS",
                                                                   "result": "0"})
    waiter.join(15)
    assert outcome == [True]


# -- results and HRESULTs -----------------------------------------------------------------

FAILURES = [
    ("unexpected", VMTaskResult.UnexpectedError, hresults.E_UNEXPECTED, "boom: unexpected"),
    ("memory", VMTaskResult.OutOfMemoryError, hresults.E_OUTOFMEMORY, "memory"),
    ("enomem", VMTaskResult.OutOfMemoryError, hresults.E_OUTOFMEMORY, "memory"),
    ("enospc", VMTaskResult.DiskRelatedError, 0x80070070, "No space left"),
    ("enoent", VMTaskResult.DiskRelatedError, 0x80070002, "No such file"),
    ("eacces", VMTaskResult.DiskRelatedError, 0x80070005, "Permission denied"),
    ("eexist", VMTaskResult.DiskRelatedError, 0x80070050, "File exists"),
    ("eio", VMTaskResult.DiskRelatedError, 0x8007001D, "Input/output error"),
    ("illegal", VMTaskResult.IllegalValueError, hresults.E_INVALIDARG, "VHD maximum"),
    ("incompatible", VMTaskResult.IncompatibleSavedStateError, 0x80040205, "256 MB"),
]


@pytest.mark.parametrize(("kind", "result", "hresult", "text"), FAILURES,
                         ids=[f[0] for f in FAILURES])
def test_failures_map_to_result_and_hresult(
    server: VirtualServer, kind: str, result: VMTaskResult, hresult: int, text: str
) -> None:
    task = server.submit("tests.fail", description=f"fail {kind}", cancelable=False,
                         kwargs={"kind": kind})
    assert task.wait_for_completion(20_000)
    snap = task.snapshot()
    assert (snap.result, snap.error) == (result, hresult)
    assert text.lower() in snap.error_description.lower()
    assert snap.percent_completed == 40  # a failure keeps the progress it had made
    assert snap.state == "FAILURE"


def test_the_time_limit_ends_timeouterror(server: VirtualServer) -> None:
    task = server.submit("tests.overrun", description="overrun", cancelable=True)
    assert task.wait_for_completion(30_000)
    assert (task.result, task.error) == (VMTaskResult.TimeOutError, 0x800705B4)


def test_failures_are_stored_as_plain_strings(server: VirtualServer,
                                              redis_server: RedisServer) -> None:
    task = server.submit("tests.fail", description="x", cancelable=False,
                         kwargs={"kind": "enospc"})
    assert task.wait_for_completion(20_000)
    raw = redis_server.client().hgetall(keys.task_record(task.id))
    assert raw["result"] == "4" and raw["error"] == str(0x80070070)
    assert raw["error_description"] == "[Errno 28] No space left on device: 'disk.img'"
    # The record is the only result store: Celery keeps no (pickled or other) copy.
    assert redis_server.client().get(f"celery-task-meta-{task.id}") is None


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"duration_ms": -1}, {"steps": -5}, {"duration_ms": "10"},
                                    {"steps": 10_001}, {"duration_ms": 3_600_001}])
def test_bad_arguments_raise_before_anything_is_queued(
    server: VirtualServer, redis_server: RedisServer, kwargs: dict[str, Any]
) -> None:
    before = redis_server.client().zcard(keys.RECENT_TASKS)
    with pytest.raises(errors.InvalidArgumentError) as caught:
        server.ping(**kwargs)
    assert caught.value.hresult == hresults.E_INVALIDARG
    assert redis_server.client().zcard(keys.RECENT_TASKS) == before


def test_an_unknown_host_is_refused(server: VirtualServer) -> None:
    with pytest.raises(errors.HostUnavailableError):
        server.ping(host="nosuchhost")
    with pytest.raises(errors.InvalidArgumentError):
        server.ping(host="bad host/../x")


def test_an_unreachable_broker_raises_brokerunavailable(tmp_path: Path) -> None:
    from workers.devtools.sandbox import free_port

    server = VirtualServer(f"redis://:s3cret@127.0.0.1:{free_port()}/0", host="alpha")
    with pytest.raises(errors.BrokerUnavailableError) as caught:
        server.get_task("whatever")
    assert "s3cret" not in str(caught.value)  # never print a secret
    with pytest.raises(errors.BrokerUnavailableError):
        server.ping()


# -- cancellation ----------------------------------------------------------------------------


def test_cancel_a_running_task(server: VirtualServer) -> None:
    task = server.ping(duration_ms=30_000, steps=100)
    wait_until(lambda: task.percent_completed > 0, 20, "progress")
    task.cancel()
    assert task.wait_for_completion(10_000)
    snap = task.snapshot()
    assert (snap.result, snap.error) == (VMTaskResult.Cancelled, hresults.E_ABORT)
    assert 0 < snap.percent_completed < 100
    assert snap.state == "REVOKED"


def test_cancel_a_queued_task_means_it_never_runs(
    redis_server: RedisServer, beta: WorkerProcess, tmp_path: Path
) -> None:
    server = VirtualServer(redis_server.url, host="beta")
    blocker = server.ping(duration_ms=30_000, steps=1)  # beta has one pool process
    wait_started(blocker)
    marker = tmp_path / "ran.txt"
    queued = server.submit("tests.write_marker", description="queued", cancelable=True,
                           kwargs={"path": str(marker)})
    queued.cancel()
    assert queued.wait_for_completion(0) is True
    assert (queued.result, queued.error) == (VMTaskResult.Cancelled, hresults.E_ABORT)
    blocker.cancel()
    # Queue order: anything after the cancelled task proves it was consumed and skipped.
    after = server.submit("tests.write_marker", description="after", cancelable=True,
                          kwargs={"path": str(marker)})
    assert after.wait_for_completion(30_000) and after.result is VMTaskResult.Success
    assert marker.read_text().split() == [after.id]
    assert queued.snapshot().started is None


def test_a_noncancelable_task_refuses_cancel(server: VirtualServer) -> None:
    task = server.submit("tests.uncancelable_sleep", description="no cancel", cancelable=False,
                         kwargs={"seconds": 1})
    assert task.is_cancelable is False
    with pytest.raises(errors.TaskNotCancelableError):
        task.cancel()
    assert task.wait_for_completion(20_000) and task.result is VMTaskResult.Success


def test_a_redelivered_message_never_runs_twice(
    server: VirtualServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    marker = tmp_path / "ran.txt"
    task = server.submit("tests.write_marker", description="once", cancelable=True,
                         kwargs={"path": str(marker)})
    assert task.wait_for_completion(20_000)
    # Deliver the same message again, as a broker redelivery would.
    server.celery.send_task("tests.write_marker", kwargs={"path": str(marker)},
                            task_id=task.id, queue="host.alpha")
    probe = server.submit("tests.write_marker", description="probe", cancelable=True,
                          kwargs={"path": str(marker)})
    # alpha has two pool processes; wait until the duplicate has surely been consumed.
    assert probe.wait_for_completion(20_000)
    wait_until(lambda: redis_server.client().llen("host.alpha") == 0, 20, "queue drained")
    assert marker.read_text().split().count(task.id) == 1
    assert redis_server.client().hget(keys.task_record(task.id), "runs") == "1"


def test_pickled_messages_are_refused(
    redis_server: RedisServer, beta: WorkerProcess, tmp_path: Path
) -> None:
    server = VirtualServer(redis_server.url, host="beta")
    marker = tmp_path / "ran.txt"
    task_id = "11111111-2222-4333-8444-555555555555"
    server.store.create(task_id, name="tests.write_marker", description="pickled",
                        host="beta", cancelable=True, arguments={})
    evil = Celery("evil", broker=redis_server.url, set_as_current=False)
    evil.conf.update(task_serializer="pickle", accept_content=["pickle", "json"])
    evil.send_task("tests.write_marker", kwargs={"path": str(marker)}, task_id=task_id,
                   queue="host.beta", serializer="pickle")
    after = server.submit("tests.write_marker", description="after", cancelable=True,
                          kwargs={"path": str(marker)})
    assert after.wait_for_completion(30_000)  # beta consumed the pickled message first
    assert marker.read_text().split() == [after.id]
    assert server.get_task(task_id).snapshot().state == "PENDING"
    assert "ContentDisallowed" in beta.log() or "untrusted content" in beta.log()


# -- hosts and routing ---------------------------------------------------------------------


def test_hosts_lists_live_workers_and_routes_by_host(
    redis_server: RedisServer, alpha: WorkerProcess, beta: WorkerProcess
) -> None:
    server = VirtualServer(redis_server.url)
    assert {"alpha", "beta"} <= set(server.hosts)
    with pytest.raises(errors.InvalidArgumentError, match="Several hosts"):
        server.ping()
    for host in ("alpha", "beta"):
        task = server.ping(host=host)
        assert task.wait_for_completion(20_000)
        worker = redis_server.client().hget(keys.task_record(task.id), "worker")
        assert worker is not None and worker.startswith(f"{host}:")
    status = server.host_status()
    assert status["alpha"]["pid"] == alpha.proc.pid  # type: ignore[union-attr]


def test_a_stopped_worker_leaves_the_host_list(spawn: Callable[..., Any]) -> None:
    redis = spawn("redis")
    worker = spawn("worker", redis_url=redis.url, host="gamma", concurrency=1)
    server = VirtualServer(redis.url)
    assert server.hosts == ["gamma"]
    assert server.resolve_host() == "gamma"  # the only live host is the default
    worker.stop()
    assert server.hosts == []
    with pytest.raises(errors.HostUnavailableError):
        server.ping()


# -- crashes and Redis restarts ---------------------------------------------------------------


def test_a_killed_worker_ends_threadcrash_without_any_worker_alive(
    spawn: Callable[..., Any], tmp_path: Path
) -> None:
    redis = spawn("redis")
    worker = spawn("worker", redis_url=redis.url, host="delta", concurrency=1,
                   env={"VMTASK_LEASE_SECONDS": "3"})
    server = VirtualServer(redis.url, host="delta", poll_interval=0.5)
    marker = tmp_path / "ran.txt"
    task = server.ping(duration_ms=60_000, steps=60)
    wait_until(lambda: task.percent_completed > 0, 20, "progress")
    killed_at = time.monotonic()
    worker.kill()
    assert task.wait_for_completion(30_000)
    assert time.monotonic() - killed_at < 30
    snap = task.snapshot()
    assert (snap.result, snap.error) == (VMTaskResult.ThreadCrashError, hresults.SERVER_FAULT)
    assert redis.client().sismember(keys.RUNNING_TASKS, task.id) == 0
    # A new worker for the host does not run the task again.
    spawn("worker", redis_url=redis.url, host="delta", concurrency=1)
    probe = server.submit("tests.write_marker", description="probe", cancelable=True,
                          kwargs={"path": str(marker)})
    assert probe.wait_for_completion(30_000)
    assert redis.client().hget(keys.task_record(task.id), "runs") == "1"


def test_the_reaper_ends_crashed_tasks_nobody_watches(spawn: Callable[..., Any]) -> None:
    redis = spawn("redis")
    doomed = spawn("worker", redis_url=redis.url, host="eps1", concurrency=1,
                   env={"VMTASK_LEASE_SECONDS": "2"})
    spawn("worker", redis_url=redis.url, host="eps2", concurrency=1,
          env={"VMTASK_HEARTBEAT_SECONDS": "1"})
    server = VirtualServer(redis.url, host="eps1")
    task_id = server.ping(duration_ms=60_000, steps=60).id
    client = redis.client()
    wait_until(lambda: client.hget(keys.task_record(task_id), "state") == STARTED, 20, "start")
    doomed.kill()
    # No producer reads the task: the surviving host's reaper must end it.
    wait_until(lambda: client.hget(keys.task_record(task_id), "state") == "FAILURE", 30,
               "the reaper")
    assert client.hget(keys.task_record(task_id), "result") == "8"


def test_a_redis_restart_during_wait_for_completion(spawn: Callable[..., Any]) -> None:
    redis = spawn("redis", appendonly=True)
    spawn("worker", redis_url=redis.url, host="zeta", concurrency=1)
    server = VirtualServer(redis.url, host="zeta", poll_interval=0.5)
    task = server.ping(duration_ms=4000, steps=8)
    wait_started(task)
    outcome: list[Any] = []

    def waiter() -> None:
        try:
            outcome.append(task.wait_for_completion(60_000))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            outcome.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    redis.stop()
    time.sleep(1.0)  # an outage of a second: nothing is waited for here
    redis.start()
    thread.join(60)
    assert outcome == [True]
    snap = task.snapshot()
    assert (snap.result, snap.percent_completed) == (VMTaskResult.Success, 100)


def test_wait_raises_brokerunavailable_when_redis_stays_down(spawn: Callable[..., Any]) -> None:
    redis = spawn("redis")
    spawn("worker", redis_url=redis.url, host="eta", concurrency=1)
    server = VirtualServer(redis.url, host="eta")
    task = server.ping(duration_ms=60_000, steps=1)
    wait_started(task)
    redis.stop()
    with pytest.raises(errors.BrokerUnavailableError):
        task.wait_for_completion(1500)
    redis.start()  # so the worker's warm shutdown is quick


def test_environment_is_read_for_defaults(redis_server: RedisServer, alpha: WorkerProcess,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMTASK_REDIS_URL", redis_server.url)
    monkeypatch.setenv("VMTASK_HOST", "alpha")
    server = VirtualServer()
    task = server.ping()
    assert task.wait_for_completion(20_000)
    assert server.store.read(task.id).host == "alpha"
    assert os.environ["VMTASK_HOST"] == "alpha"


def test_tasks_lists_recent_tasks_with_filters(server: VirtualServer,
                                               redis_server: RedisServer) -> None:
    ok = server.ping()
    failed = server.submit("tests.fail", description="listed failure", cancelable=False,
                           kwargs={"kind": "eio"})
    assert ok.wait_for_completion(20_000) and failed.wait_for_completion(20_000)
    recent = server.tasks(limit=5)
    assert [t.id for t in recent][:2] == [failed.id, ok.id]  # newest first
    failures = server.tasks(state="FAILURE", limit=500)
    assert failed.id in [t.id for t in failures] and ok.id not in [t.id for t in failures]
    assert all(t.host == "alpha" for t in server.tasks(host="alpha", limit=20))
    assert server.tasks(host="nohost") == []
    snap = next(t for t in failures if t.id == failed.id)
    assert (snap.description, snap.result, snap.started is not None) == (
        "listed failure", VMTaskResult.DiskRelatedError, True)
    # Completed records expire after the retention (default one day).
    ttl = redis_server.client().ttl(keys.task_record(ok.id))
    assert 0 < ttl <= 86400
    with pytest.raises(errors.InvalidArgumentError):
        server.tasks(state="DONE")


def test_a_filter_finds_old_matches_behind_many_others_in_two_round_trips(
        server: VirtualServer, redis_server: RedisServer) -> None:
    """Redis filters the history: one script pages through the index (past its
    1,000-entry pages) and returns only the matches, which are then read at once."""
    client = redis_server.client()
    host, now = "listing-host", time.time()
    ids = [f"listing-{i:05d}" for i in range(1_501)]
    pipe = client.pipeline(transaction=False)
    for age, task_id in enumerate(ids):  # ids[0] is the oldest, and the only failure
        state = "FAILURE" if age == 0 else "SUCCESS"
        pipe.hset(keys.task_record(task_id), mapping={
            "name": "vmtask.ping", "description": "listed", "host": host, "state": state,
            "cancelable": "0", "percent": "100", "created": repr(now - 10_000 + age)})
        pipe.zadd(keys.RECENT_TASKS, {task_id: now - 10_000 + age})
    pipe.execute()
    try:
        server.tasks(limit=1)  # warm: the connection and the script
        with wire_counter() as counter:
            failures = server.tasks(state="FAILURE", host=host, limit=10)
        assert [t.id for t in failures] == [ids[0]]
        assert counter["<sends>"] == 2, counter
        newest = server.tasks(state="SUCCESS", host=host, limit=3)
        assert [t.id for t in newest] == ids[:-4:-1]
    finally:
        client.delete(*(keys.task_record(i) for i in ids))
        client.zrem(keys.RECENT_TASKS, *ids)


def test_two_hosts_route_and_survive_each_others_loss(
    spawn: Callable[..., Any], tmp_path: Path
) -> None:
    redis = spawn("redis")
    east = spawn("worker", redis_url=redis.url, host="east", concurrency=1,
                 env={"VMTASK_LEASE_SECONDS": "3", "VMTASK_HEARTBEAT_SECONDS": "2"})
    spawn("worker", redis_url=redis.url, host="west", concurrency=1,
          env={"VMTASK_HEARTBEAT_SECONDS": "2"})
    server = VirtualServer(redis.url, poll_interval=0.5)
    assert server.hosts == ["east", "west"]
    status = server.host_status()
    assert status["east"]["storage_root"] != status["west"]["storage_root"]
    doomed = server.ping(duration_ms=60_000, steps=60, host="east")
    wait_started(doomed)
    # The count travels in the heartbeat, refreshed every beat.
    wait_until(lambda: server.host_status()["east"]["tasks_running"] == 1, 10, "the count")
    east.kill()  # the host is cut off mid-task
    survivor = server.ping(duration_ms=100, host="west")
    assert survivor.wait_for_completion(20_000) and survivor.result is VMTaskResult.Success
    assert doomed.wait_for_completion(30_000)
    assert doomed.result is VMTaskResult.ThreadCrashError
    wait_until(lambda: server.hosts == ["west"], 20, "east to drop out of the host list")
    with pytest.raises(errors.HostUnavailableError):
        server.ping(host="east")
