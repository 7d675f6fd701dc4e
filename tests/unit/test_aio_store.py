"""The asyncio producer's store (`api.aio_store.AsyncTaskStore`) sends the registry's
calls as the sync one does (`api.store.TaskStore`): the same record for the same
submit (a composite task's child names its parent), a server without the scripts
cached answered by their bodies, and a crash judgment that cancels a composite
task's children.  On a real redis-server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from api.aio_store import AsyncTaskStore, async_client
from api.connection import parse_redis_url
from api.enums import VMTaskResult
from api.protocol import keys, records, taskcalls
from api.protocol.records import Field
from api.scripts import Scripts
from api.settings import Settings
from api.store import TaskStore
from workers.devtools.sandbox import RedisServer
from workers.runtime import TaskRun, WorkerRedis

HOST = "h1"
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


async def with_async_store(settings: Settings, scenario: object) -> object:
    endpoint = parse_redis_url(settings.redis_url)
    client = async_client(endpoint, 5.0)
    try:
        store = AsyncTaskStore(client, settings.redis_url, settings.retention_seconds,
                               endpoint, settings.lease_seconds)
        return await scenario(store)  # type: ignore[operator]
    finally:
        await client.aclose(close_connection_pool=True)


def submission(task_id: str, **extra: str) -> dict[str, object]:
    return {"name": "disk.convert", "description": "convert a.vhd", "host": HOST,
            "cancelable": True, "arguments": {"path": "a.vhd"},
            "message": [("lpush", keys.host_queue(HOST), f"message of {task_id}")],
            "extra": extra or None}


def test_an_async_submit_writes_the_record_a_sync_one_does_and_reads_it_back(
        store: TaskStore, db: redis.Redis, settings: Settings) -> None:
    db.set(keys.host_heartbeat(HOST), "{}")
    link = {Field.PARENT: "p1", Field.ROOT: "r1"}
    assert store.create("sync", **submission("sync", **link))  # type: ignore[arg-type]
    db.script_flush()  # a new primary: no script cached

    async def scenario(aio: AsyncTaskStore) -> None:
        assert await aio.create("async", **submission("async", **link))  # type: ignore[arg-type]
        written = {task_id: db.hgetall(keys.task_record(task_id))
                   for task_id in ("sync", "async")}
        assert written["async"].pop(Field.CREATED) and written["sync"].pop(Field.CREATED)
        assert written["async"] == written["sync"]
        assert (written["async"][Field.PARENT], written["async"][Field.ROOT]) == ("p1", "r1")
        snapshot = await aio.read("async")
        assert (snapshot.state, snapshot.parent, snapshot.host) == (records.PENDING, "p1", HOST)
        db.script_flush()
        many = await aio.read_many(["async", "sync", "nosuchtask"])
        assert [s.id if s else None for s in many] == ["async", "sync", None]
        assert await aio.cancel("sync") == "REVOKED"

    asyncio.run(with_async_store(settings, scenario))  # type: ignore[arg-type]
    assert db.lrange(keys.host_queue(HOST), 0, -1) == ["message of async", "message of sync"]
    assert db.hget(keys.task_record("sync"), Field.STATE) == records.REVOKED


def test_an_async_crash_judgment_cancels_the_children_of_a_composite_task(
        store: TaskStore, db: redis.Redis, settings: Settings) -> None:
    db.set(keys.host_heartbeat(HOST), "{}")
    for task_id in ("parent", "child1", "child2"):
        assert store.create(task_id, **submission(task_id))  # type: ignore[arg-type]
    worker = WorkerRedis(settings)
    try:
        assert TaskRun("parent", settings, worker).begin() == records.BEGUN
    finally:
        worker.client.close()
    db.hset(keys.task_record("parent"), Field.CHILDREN, json.dumps(["child1", "child2"]))
    db.delete(keys.task_lease("parent"))

    async def scenario(aio: AsyncTaskStore) -> bool:
        return (await aio.read("parent")).result is VMTaskResult.ThreadCrashError

    assert asyncio.run(with_async_store(settings, scenario))  # type: ignore[arg-type]
    assert [db.hget(keys.task_record(child), Field.STATE) for child in ("child1", "child2")] \
        == [records.REVOKED, records.REVOKED]


def test_every_argument_builder_names_the_lines_of_its_script() -> None:
    """The builders both stores call with ``**`` (which the architecture test's look at
    call sites skips) give exactly the names their script's registry line declares."""
    built = [
        (Scripts.task_submit, taskcalls.submit_arguments(
            "t", name="n", description="d", host=HOST, cancelable=True, arguments={},
            message=[("lpush", "q", "m")], extra={Field.PARENT: "p"})),
        (Scripts.task_read, taskcalls.read_arguments("t")),
        (Scripts.task_withdraw, taskcalls.withdraw_arguments("t", RETENTION)),
        (Scripts.task_log_read, taskcalls.log_arguments("t", tail=3)),
        (Scripts.hosts_live, taskcalls.hosts_arguments()),
        (Scripts.task_cancel, records.cancel_arguments("t", RETENTION, revoke_queued=True)),
        (Scripts.task_finish, records.judge_arguments("t", RETENTION, 5.0)),
        (Scripts.task_list, records.list_arguments(None, HOST, 10, 100)),
    ]
    for spec, arguments in built:
        numkeys, _ = spec.arguments(arguments)
        assert numkeys == len(spec.keys), spec.name  # every key given, none left out
