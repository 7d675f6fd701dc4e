"""The task record's Lua scripts (`api/protocol/lua/task_*.lua`) on a real redis-server,
each called through the wrapper the product calls it with: `api.store.TaskStore` for
the producer's, `workers.runtime.TaskRun` and its `WorkerRedis` for the worker's.  Every
transition, with the exact fields and keys it leaves, and every refusal, with its reply
and nothing written."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from api.enums import VMTaskResult
from api.errors import BrokerUnavailableError, TaskNotCancelableError, TaskNotFoundError
from api.protocol import hresults, keys, records
from api.protocol.records import CRASH_DESCRIPTION, TaskSnapshot, cancel_record
from api.protocol.taskcalls import PENDING_RECORD_TTL_SECONDS, UNCONFIRMED_DESCRIPTION
from api.scripts import Scripts
from api.settings import Settings
from api.store import TaskStore
from workers.devtools.sandbox import RedisServer
from workers.failures import Cancelled, Failure
from workers.runtime import TaskRun, WorkerRedis, worker_identity
from workers.tasks.snapshots import seal

HOST = "h1"
NAME = "disk.convert"
T = "t1"
RECORD, LEASE, CHANNEL, LOG = (keys.task_record(T), keys.task_lease(T), keys.task_channel(T),
                               keys.task_log(T))
RETENTION = 600


@pytest.fixture
def settings(lua_redis: RedisServer, tmp_path: Path) -> Settings:
    return Settings(redis_url=lua_redis.url, host=HOST, storage_root=tmp_path,
                    lease_seconds=5.0, retention_seconds=float(RETENTION))


@pytest.fixture
def store(db: redis.Redis, settings: Settings) -> Iterator[TaskStore]:
    producer = TaskStore(db, settings.redis_url, settings.retention_seconds,
                         lease_seconds=settings.lease_seconds)
    yield producer
    producer.close()


@pytest.fixture
def conn(settings: Settings) -> Iterator[WorkerRedis]:
    worker = WorkerRedis(settings)
    yield worker
    worker.client.close()


def submit(store: TaskStore, db: redis.Redis, task_id: str = T, *,
           cancelable: bool = True) -> None:
    db.set(keys.host_heartbeat(HOST), "{}")  # the host is live
    assert store.create(task_id, name=NAME, description="convert a.vhd", host=HOST,
                        cancelable=cancelable, arguments={"path": "a.vhd"},
                        message=[("lpush", keys.host_queue(HOST), f"message of {task_id}")])


def start(store: TaskStore, db: redis.Redis, settings: Settings, conn: WorkerRedis, *,
          cancelable: bool = True) -> TaskRun:
    submit(store, db, cancelable=cancelable)
    run = TaskRun(T, settings, conn)
    assert run.begin() == records.BEGUN
    return run


def log_of(db: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(entry) for entry in db.lrange(LOG, 0, -1)]


def published(pubsub: Any) -> list[str]:
    """The messages on the task's channel since the subscription, as sent."""
    out = []
    while (message := pubsub.get_message(timeout=0.2)) is not None:
        if message["type"] == "message":
            out.append(message["data"])
    return out


@pytest.fixture
def channel(db: redis.Redis) -> Iterator[Any]:
    pubsub = db.pubsub()
    pubsub.subscribe(CHANNEL)
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    yield pubsub
    pubsub.close()


# -- submit ------------------------------------------------------------------------------


def test_a_submit_writes_the_record_its_indexes_and_the_message_at_once(
        store: TaskStore, db: redis.Redis) -> None:
    submit(store, db)
    fields = db.hgetall(RECORD)
    created = fields.pop("created")
    assert fields == {"name": NAME, "description": "convert a.vhd", "host": HOST,
                      "cancelable": "1", "state": "PENDING", "percent": "0",
                      "arguments": '{"path": "a.vhd"}'}
    assert abs(float(created) - time.time()) < 5
    assert PENDING_RECORD_TTL_SECONDS - 5 <= db.ttl(RECORD) <= PENDING_RECORD_TTL_SECONDS
    assert db.zscore(keys.RECENT_TASKS, T) == float(created)
    assert db.zscore(keys.host_pending(HOST), T) == float(created)
    assert db.lrange(keys.host_queue(HOST), 0, -1) == [f"message of {T}"]
    assert sorted(db.keys()) == sorted([RECORD, keys.RECENT_TASKS, keys.host_pending(HOST),
                                        keys.host_queue(HOST), keys.host_heartbeat(HOST)])


def test_a_submit_to_a_host_without_a_live_worker_writes_nothing(
        store: TaskStore, db: redis.Redis) -> None:
    assert not store.create(T, name=NAME, description="d", host=HOST, cancelable=True,
                            arguments={}, message=[("lpush", keys.host_queue(HOST), "m")])
    assert db.keys() == []


def test_a_submit_sent_again_finds_its_record_and_sends_no_second_message(
        store: TaskStore, db: redis.Redis) -> None:
    submit(store, db)
    before = db.hgetall(RECORD)
    submit(store, db)  # a retry after a lost reply: answered 2, which counts as live
    assert db.hgetall(RECORD) == before
    assert db.llen(keys.host_queue(HOST)) == 1


def test_the_submit_script_runs_only_publish_commands(store: TaskStore,
                                                      db: redis.Redis) -> None:
    db.set(keys.host_heartbeat(HOST), "{}")
    with pytest.raises(ValueError, match="not a publish command"):
        store.create(T, name=NAME, description="d", host=HOST, cancelable=True,
                     arguments={}, message=[("del", keys.host_queue(HOST), "x")])
    # The script refuses it too, for a caller that skipped the check.
    with pytest.raises(redis.ResponseError, match="not a publish command: del"):
        Scripts.of(db).task_submit(
            record=RECORD, recent=keys.RECENT_TASKS, host_pending=keys.host_pending(HOST),
            now=repr(time.time()), ttl=60, task_id=T, heartbeat=keys.host_heartbeat(HOST),
            field_count=2, items=["state", "PENDING", "del", keys.host_heartbeat(HOST), "x"])
    assert db.keys() == [keys.host_heartbeat(HOST)]


# -- the start gate ----------------------------------------------------------------------


def test_the_start_gate_begins_a_pending_task_once(
        store: TaskStore, db: redis.Redis, settings: Settings, conn: WorkerRedis) -> None:
    submit(store, db)
    run = TaskRun(T, settings, conn)
    assert run.begin() == records.BEGUN
    identity = worker_identity(settings)
    fields = db.hgetall(RECORD)
    assert (fields["state"], fields["worker"], fields["node"], fields["runs"]) == (
        "STARTED", identity, "", "1")
    assert abs(float(fields["started"]) - time.time()) < 5
    assert db.get(LEASE) == identity and 0 < db.pttl(LEASE) <= 5000
    assert db.sismember(keys.RUNNING_TASKS, T)
    assert db.sismember(keys.host_running(HOST), T)
    deadline = db.zscore(keys.LEASE_DEADLINES, T)
    assert deadline is not None and abs(deadline - (time.time() * 1000 + 5000)) < 2000
    assert db.zscore(keys.host_pending(HOST), T) is None  # no longer queued
    assert log_of(db)[-1] == {"t": fields["started"], "kind": "start", "worker": identity}

    # The same worker's start sent again (its reply lost) passes as its own...
    assert run.begin() == records.BEGUN
    assert db.hget(RECORD, "runs") == "1"
    # ...and any other delivery meets the state it found, writing nothing.
    other = TaskRun(T, dataclasses.replace(settings, host="h2"), conn)
    assert other.begin() == "STARTED"
    assert db.hget(RECORD, "runs") == "1" and db.get(LEASE) == identity
    assert not db.exists(keys.host_running("h2"))


def test_the_start_gate_refuses_a_missing_a_revoked_and_an_ended_task(
        store: TaskStore, db: redis.Redis, settings: Settings, conn: WorkerRedis) -> None:
    assert TaskRun(T, settings, conn).begin() == "MISSING"
    assert db.keys() == []
    submit(store, db)
    assert store.cancel(T) == "REVOKED"
    assert TaskRun(T, settings, conn).begin() == "REVOKED"
    assert not db.exists(LEASE) and not db.sismember(keys.RUNNING_TASKS, T)
    assert "runs" not in db.hgetall(RECORD)
    ended = TaskRun("t2", settings, conn)
    submit(store, db, "t2")
    assert ended.begin() == records.BEGUN and ended.finish(None) == "OK"
    assert TaskRun("t2", settings, conn).begin() == "SUCCESS"
    assert not db.exists(keys.task_lease("t2"))


# -- progress and lease ------------------------------------------------------------------


def test_progress_only_rises_and_only_while_started(
        store: TaskStore, db: redis.Redis, settings: Settings, conn: WorkerRedis,
        channel: Any) -> None:
    submit(store, db)
    # Still queued: refused.
    assert conn.scripts.task_progress(record=RECORD, channel=CHANNEL, percent=10) == 0
    assert db.hget(RECORD, "percent") == "0"
    run = TaskRun(T, settings, conn)
    assert run.begin() == records.BEGUN
    run.report_progress(42)
    assert db.hget(RECORD, "percent") == "42"
    assert conn.scripts.task_progress(record=RECORD, channel=CHANNEL, percent=30) == 0
    assert conn.scripts.task_progress(record=RECORD, channel=CHANNEL, percent=42) == 0
    assert db.hget(RECORD, "percent") == "42"
    assert conn.scripts.task_progress(record=RECORD, channel=CHANNEL, percent=43) == 1
    assert db.hget(RECORD, "percent") == "43"
    assert published(channel) == ["progress", "progress"]


def renew(conn: WorkerRedis, settings: Settings) -> Any:
    """The lease keeper's call (`LeaseKeeper._renew_forever`)."""
    return conn.scripts.task_renew(record=RECORD, lease=LEASE, deadlines=keys.LEASE_DEADLINES,
                                   worker=worker_identity(settings), lease_ms=7000, task_id=T)


def test_a_lease_is_renewed_by_its_holder_and_taken_back_only_by_the_recorded_worker(
        store: TaskStore, db: redis.Redis, settings: Settings, conn: WorkerRedis) -> None:
    start(store, db, settings, conn)
    identity = worker_identity(settings)
    assert renew(conn, settings) == 1
    assert db.get(LEASE) == identity and 5000 < db.pttl(LEASE) <= 7000
    assert db.zscore(keys.LEASE_DEADLINES, T) > time.time() * 1000 + 5000  # type: ignore[operator]

    db.set(LEASE, "other:m:1")  # someone else's lease: not ours to touch
    assert renew(conn, settings) == 0
    assert db.get(LEASE) == "other:m:1"

    db.delete(LEASE)  # lapsed while the primary switched; the record still names us
    assert renew(conn, settings) == 1
    assert db.get(LEASE) == identity

    db.delete(LEASE)
    db.hset(RECORD, "worker", "other:m:1")  # judged crashed and started again elsewhere
    assert renew(conn, settings) == 0
    assert not db.exists(LEASE)


# -- finish ------------------------------------------------------------------------------


def test_a_finish_writes_the_outcome_and_forgets_the_running_task(
        store: TaskStore, db: redis.Redis, settings: Settings, conn: WorkerRedis,
        channel: Any) -> None:
    run = start(store, db, settings, conn)
    assert run.finish(None, output={"size": 5}) == "OK"
    fields = db.hgetall(RECORD)
    finished = fields.pop("finished")
    assert {k: fields[k] for k in ("state", "result", "error", "error_description",
                                   "percent", "output")} == {
        "state": "SUCCESS", "result": "0", "error": "0", "error_description": "",
        "percent": "100", "output": '{"size": 5}'}
    assert not db.exists(LEASE)
    assert not db.sismember(keys.RUNNING_TASKS, T)
    assert not db.sismember(keys.host_running(HOST), T)
    assert db.zscore(keys.LEASE_DEADLINES, T) is None
    assert RETENTION - 5 <= db.ttl(RECORD) <= RETENTION
    assert RETENTION - 5 <= db.ttl(LOG) <= RETENTION  # the log lives as long as the record
    assert log_of(db)[-1] == {"t": finished, "kind": "end", "state": "SUCCESS", "result": "0",
                              "error": "0", "text": "", "judged": "0"}
    assert published(channel) == ["done"]


def test_a_failed_finish_keeps_the_highest_percent_and_a_cancelled_one_reads_revoked(
        store: TaskStore, db: redis.Redis, settings: Settings, conn: WorkerRedis) -> None:
    run = start(store, db, settings, conn)
    assert conn.scripts.task_progress(record=RECORD, channel=CHANNEL, percent=42) == 1
    full = Failure(VMTaskResult.DiskRelatedError, 0x80070070, "no space left")
    assert run.finish(full) == "OK"
    assert [db.hget(RECORD, f) for f in ("state", "result", "error", "error_description",
                                         "percent")] == [
        "FAILURE", "4", str(0x80070070), "no space left", "42"]
    submit(store, db, "t2")
    second = TaskRun("t2", settings, conn)
    assert second.begin() == records.BEGUN
    stopped = Failure(VMTaskResult.Cancelled, hresults.E_ABORT, "Cancelled")
    assert second.finish(stopped) == "OK"
    assert db.hmget(keys.task_record("t2"), "state", "result", "error") == [
        "REVOKED", "1", str(hresults.E_ABORT)]


def test_a_finish_refuses_a_task_that_is_not_running(
        store: TaskStore, db: redis.Redis, settings: Settings, conn: WorkerRedis) -> None:
    assert TaskRun(T, settings, conn).finish(None) == "MISSING"
    assert db.keys() == []
    submit(store, db)
    before = db.hgetall(RECORD)
    assert TaskRun(T, settings, conn).finish(None) == "PENDING"
    assert db.hgetall(RECORD) == before
    run = TaskRun(T, settings, conn)
    assert run.begin() == records.BEGUN and run.finish(None) == "OK"
    ended = db.hgetall(RECORD)
    # A second finish (another delivery's) leaves the first outcome as it is.
    assert run.finish(Failure(VMTaskResult.UnexpectedError, 1, "late")) == "SUCCESS"
    assert db.hgetall(RECORD) == ended


def test_a_crash_is_judged_once_the_lease_is_gone_and_the_primary_has_settled(
        store: TaskStore, db: redis.Redis, settings: Settings, conn: WorkerRedis) -> None:
    run = start(store, db, settings, conn)
    assert not store.judge_crashed(T)  # the lease is live
    assert db.hget(RECORD, "state") == "STARTED"
    db.delete(LEASE)
    # A primary not seen before (a failover): no lease could be renewed meanwhile.
    db.hset(keys.REDIS_PRIMARY, mapping={"replid": "0" * 40, "since": "0"})
    assert not store.judge_crashed(T)
    replid, since = db.hmget(keys.REDIS_PRIMARY, "replid", "since")
    assert replid != "0" * 40 and abs(float(since) - time.time()) < 5  # type: ignore[arg-type]
    assert not store.judge_crashed(T)  # within the grace (the lease's 5 s)
    assert db.hget(RECORD, "state") == "STARTED"
    db.hset(keys.REDIS_PRIMARY, "since", int(time.time()) - 60)  # the grace has passed
    assert store.judge_crashed(T)
    assert db.hmget(RECORD, "state", "result", "error", "error_description") == [
        "FAILURE", str(int(VMTaskResult.ThreadCrashError)), str(hresults.SERVER_FAULT),
        CRASH_DESCRIPTION]
    assert log_of(db)[-1]["judged"] == "1"
    assert not db.sismember(keys.RUNNING_TASKS, T)
    assert not db.sismember(keys.host_running(HOST), T)
    # The worker, woken, cannot overwrite the judgment.
    assert run.finish(None) == "FAILURE"


# -- cancel, withdraw, seal --------------------------------------------------------------


def test_a_cancel_revokes_a_queued_task(store: TaskStore, db: redis.Redis,
                                        channel: Any) -> None:
    submit(store, db)
    assert store.cancel(T) == "REVOKED"
    fields = db.hgetall(RECORD)
    finished = fields["finished"]
    assert {k: fields[k] for k in ("cancel_requested", "state", "result", "error",
                                   "error_description")} == {
        "cancel_requested": "1", "state": "REVOKED", "result": "1",
        "error": str(hresults.E_ABORT), "error_description": "Cancelled before it started"}
    assert RETENTION - 5 <= db.ttl(RECORD) <= RETENTION
    assert db.zscore(keys.host_pending(HOST), T) is None
    assert log_of(db)[-1] == {"t": finished, "kind": "end", "state": "REVOKED", "result": "1",
                              "error": str(hresults.E_ABORT),
                              "text": "Cancelled before it started"}
    assert published(channel) == ["done"]
    with pytest.raises(TaskNotCancelableError, match="already complete"):
        store.cancel(T)


def test_a_queued_task_that_is_not_cancelable_is_revoked_only_by_celery_revoke(
        store: TaskStore, db: redis.Redis) -> None:
    submit(store, db, cancelable=False)
    with pytest.raises(TaskNotCancelableError, match="cannot be cancelled"):
        store.cancel(T)
    assert db.hget(RECORD, "state") == "PENDING" and not db.hexists(RECORD, "cancel_requested")
    # As workers.monitoring does.
    assert cancel_record(Scripts.of(db), T, RETENTION, revoke_queued=True) == "REVOKED"
    assert db.hget(RECORD, "state") == "REVOKED"


def test_a_cancel_of_a_running_task_is_a_request(
        store: TaskStore, db: redis.Redis, settings: Settings, conn: WorkerRedis,
        channel: Any) -> None:
    run = start(store, db, settings, conn)
    assert store.cancel(T) == "REQUESTED"
    assert db.hmget(RECORD, "state", "cancel_requested") == ["STARTED", "1"]
    assert log_of(db)[-1]["kind"] == "cancel"
    assert published(channel) == ["cancel"]
    assert run.cancel_requested()


def test_a_cancel_is_refused_for_a_running_task_that_is_not_cancelable_or_a_missing_one(
        store: TaskStore, db: redis.Redis, settings: Settings, conn: WorkerRedis) -> None:
    with pytest.raises(TaskNotFoundError):
        store.cancel(T)
    start(store, db, settings, conn, cancelable=False)
    before = db.hgetall(RECORD)
    with pytest.raises(TaskNotCancelableError, match="cannot be cancelled"):
        store.cancel(T)
    assert db.hgetall(RECORD) == before


def test_an_unconfirmed_submit_is_withdrawn_unless_a_worker_took_it(
        store: TaskStore, db: redis.Redis, settings: Settings, conn: WorkerRedis) -> None:
    submit(store, db)
    with pytest.raises(BrokerUnavailableError, match="withdrawn"):
        store.withdraw_unconfirmed(T, NAME)
    assert db.hmget(RECORD, "state", "cancel_requested", "result", "error",
                    "error_description") == [
        "REVOKED", "1", "1", str(hresults.E_ABORT), UNCONFIRMED_DESCRIPTION]
    assert db.zscore(keys.host_pending(HOST), T) is None
    assert TaskRun(T, settings, conn).begin() == "REVOKED"  # the gate drops its message

    submit(store, db, "t2")
    assert TaskRun("t2", settings, conn).begin() == records.BEGUN
    store.withdraw_unconfirmed("t2", NAME)  # it runs: the submit stands
    assert db.hget(keys.task_record("t2"), "state") == "STARTED"
    with pytest.raises(BrokerUnavailableError):
        store.withdraw_unconfirmed("t3", NAME)  # never arrived


def test_a_seal_ends_cancelability_unless_a_cancel_came_first(
        store: TaskStore, db: redis.Redis, settings: Settings, conn: WorkerRedis) -> None:
    run = start(store, db, settings, conn)
    seal(run)
    assert db.hget(RECORD, "cancelable") == "0"
    with pytest.raises(TaskNotCancelableError):
        store.cancel(T)
    assert not db.hexists(RECORD, "cancel_requested")

    submit(store, db, "t2")
    second = TaskRun("t2", settings, conn)
    assert second.begin() == records.BEGUN
    assert store.cancel("t2") == "REQUESTED"
    with pytest.raises(Cancelled):
        seal(second)
    assert db.hget(keys.task_record("t2"), "cancelable") == "1"


# -- the log -----------------------------------------------------------------------------


def test_only_the_running_worker_writes_the_log(
        store: TaskStore, db: redis.Redis, settings: Settings, conn: WorkerRedis) -> None:
    with pytest.raises(TaskNotFoundError):
        store.log(T)
    run = start(store, db, settings, conn)
    run.log("copying 1 of 2")
    first, entries = store.log_entries(T)
    assert first == 1 and [e.get("kind") or e["m"] for e in entries] == [
        "start", "copying 1 of 2"]
    assert store.log(T)[-1].endswith(" copying 1 of 2")
    TaskRun(T, dataclasses.replace(settings, host="h2"), conn).log("a stray worker")
    assert conn.scripts.task_log_write(record=RECORD, channel=CHANNEL, worker="other:m:1",
                                       lines=["1.0", "stray"]) == 0
    assert db.llen(LOG) == 2
    assert run.finish(None) == "OK"
    run.log("after the end")
    assert [e.get("m") for e in log_of(db)] == [None, "copying 1 of 2", None]


def test_the_log_keeps_the_last_entries_and_numbers_them_over_the_task_life(
        store: TaskStore, db: redis.Redis, settings: Settings, conn: WorkerRedis) -> None:
    start(store, db, settings, conn)  # entry 1: the start
    lines = [item for n in range(1000) for item in (repr(time.time()), f"line {n}")]
    assert conn.scripts.task_log_write(record=RECORD, channel=CHANNEL,
                                       worker=worker_identity(settings), lines=lines) == 1
    assert db.llen(LOG) == 1000 and db.hget(RECORD, "log_dropped") == "1"
    first, entries = store.log_entries(T, tail=3)
    assert (first, [e["m"] for e in entries]) == (999, ["line 997", "line 998", "line 999"])
    assert store.log_entries(T, after=1000) == (1001, [entries[-1]])
    assert store.log_entries(T, after=1001) == (1002, [])
    first, entries = store.log_entries(T)
    assert first == 2 and entries[0]["m"] == "line 0"  # entry 1 (the start) was dropped


# -- metrics -----------------------------------------------------------------------------


def test_an_ended_task_is_counted_with_its_run_and_queue_times(
        store: TaskStore, db: redis.Redis, settings: Settings, conn: WorkerRedis) -> None:
    run = start(store, db, settings, conn)
    now = time.time()
    db.hset(RECORD, mapping={"created": repr(now - 103), "started": repr(now - 100)})
    assert run.finish(None) == "OK"
    labels = f"{NAME}\t{HOST}"
    metrics = db.hgetall(keys.METRICS)
    sums = {k: float(metrics.pop(k)) for k in [k for k in metrics if k.startswith("sum")]}
    assert metrics == {f"total\t{labels}\t0": "1",
                       f"bucket\tduration\t{labels}\t120": "1",
                       f"bucket\twait\t{labels}\t5": "1"}
    assert sums.keys() == {f"sum\tduration\t{labels}", f"sum\twait\t{labels}"}
    assert 100 <= sums[f"sum\tduration\t{labels}"] < 105
    assert sums[f"sum\twait\t{labels}"] == pytest.approx(3, abs=0.01)


def test_a_task_that_never_started_is_counted_without_times(store: TaskStore,
                                                            db: redis.Redis) -> None:
    submit(store, db)
    assert store.cancel(T) == "REVOKED"
    assert db.hgetall(keys.METRICS) == {f"total\t{NAME}\t{HOST}\t1": "1"}


# -- reads -------------------------------------------------------------------------------


def test_a_read_is_the_whole_record_and_its_lease_at_one_instant(
        store: TaskStore, db: redis.Redis, settings: Settings, conn: WorkerRedis) -> None:
    submit(store, db)
    with pytest.raises(TaskNotFoundError):
        store.read("nope")
    queued, missing = store.read_many([T, "nope"])
    assert missing is None and queued is not None
    assert queued == TaskSnapshot.from_record(T, db.hgetall(RECORD), False)
    assert TaskRun(T, settings, conn).begin() == records.BEGUN
    running = store.read(T)
    assert (running.state, running.lease_alive) == ("STARTED", True)
    assert running == TaskSnapshot.from_record(T, db.hgetall(RECORD), True)
    db.delete(LEASE)  # lapsed: read_many reads it as recorded, judging nothing
    (lapsed,) = store.read_many([T])
    assert lapsed is not None and (lapsed.state, lapsed.lease_alive) == ("STARTED", False)


def test_a_listing_filters_by_state_and_host_newest_first_within_its_horizon(
        store: TaskStore, db: redis.Redis, settings: Settings, conn: WorkerRedis) -> None:
    for task_id in ("t1", "t2", "t3", "t4"):
        submit(store, db, task_id)
    db.hset(keys.task_record("t4"), "host", "h2")
    assert TaskRun("t2", settings, conn).begin() == records.BEGUN
    db.delete(keys.task_record("t3"))  # expired: its index entry stays until trimmed
    assert store.matching(None, None, 10, 10) == ["t4", "t2", "t1"]
    assert store.matching("PENDING", None, 10, 10) == ["t4", "t1"]
    assert store.matching("PENDING", HOST, 10, 10) == ["t1"]
    assert store.matching(None, HOST, 1, 10) == ["t2"]
    assert store.matching(None, None, 10, 2) == ["t4"]  # t3, the second, is gone
