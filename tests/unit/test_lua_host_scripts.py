"""The hosts' Lua scripts on a real redis-server, called as the product calls them: a
worker's beat (`workers.host.HostBeacon`: its presence, the primary it sees, the due
leases), its withdrawal at stop, and the producer's listing of live hosts
(`VirtualServer.hosts`, `hosts_live.lua`)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from api import VirtualServer
from api.protocol import keys
from api.settings import Settings
from workers.devtools.sandbox import RedisServer
from workers.host import REAP_BATCH, HostBeacon, HostHooks
from workers.runtime import worker_identity

HOST = "h1"


@pytest.fixture
def settings(lua_redis: RedisServer, tmp_path: Path) -> Settings:
    return Settings(redis_url=lua_redis.url, host=HOST, storage_root=tmp_path,
                    heartbeat_seconds=6.0)


@pytest.fixture
def takeovers() -> list[tuple[str, float]]:
    return []


@pytest.fixture
def beacon(settings: Settings, takeovers: list[tuple[str, float]]) -> Iterator[HostBeacon]:
    def on_takeover(_client: redis.Redis, primary: str, age: float) -> None:
        takeovers.append((primary, age))

    host = HostBeacon(settings, HostHooks(), on_takeover=on_takeover)
    yield host
    host.client.close()


def withdraw(beacon: HostBeacon) -> Any:
    """`HostBeacon.stop`'s call, without a beat thread to stop first."""
    return beacon.scripts.host_withdraw(heartbeat=keys.host_heartbeat(HOST),
                                        workers=keys.host_workers(HOST),
                                        worker=beacon.identity, now=repr(time.time()))


def test_a_beat_makes_the_host_live_for_producers(
        db: redis.Redis, beacon: HostBeacon, settings: Settings) -> None:
    beacon.beat()
    beat = json.loads(db.get(keys.host_heartbeat(HOST)))  # type: ignore[arg-type]
    assert beat["host"] == HOST and beat["tasks_running"] == 0
    assert 0 < db.pttl(keys.host_heartbeat(HOST)) <= 6000
    score = db.zscore(keys.host_workers(HOST), worker_identity(settings))
    assert score is not None and 0 < score - time.time() <= 6
    assert db.smembers(keys.KNOWN_HOSTS) == {HOST}
    db.sadd(keys.KNOWN_HOSTS, "h9")  # known once, its heartbeat long gone
    with VirtualServer(settings.redis_url, host=HOST) as server:
        assert server.hosts == [HOST]
        assert server.host_status()[HOST]["host"] == HOST


def test_a_beat_notes_the_primary_and_tells_a_switch(
        db: redis.Redis, beacon: HostBeacon, takeovers: list[tuple[str, float]]) -> None:
    beacon.beat()
    replid, since = db.hmget(keys.REDIS_PRIMARY, "replid", "since")
    assert replid and since == "0" and takeovers == []  # the first primary ever seen
    db.hset(keys.REDIS_PRIMARY, mapping={"replid": "0" * 40, "since": "5"})
    beacon.beat()  # as after a failover: the replication id changed
    since = db.hget(keys.REDIS_PRIMARY, "since")
    assert db.hget(keys.REDIS_PRIMARY, "replid") == replid
    assert since is not None and abs(int(since) - time.time()) < 5
    assert takeovers == [(f"{replid}:{since}", pytest.approx(0, abs=5))]


def test_a_beat_reads_the_due_leases_and_the_reap_forgets_a_gone_record(
        db: redis.Redis, beacon: HostBeacon) -> None:
    now_ms = time.time() * 1000
    db.zadd(keys.LEASE_DEADLINES, {"due": now_ms - 1000, "later": now_ms + 60_000})
    beacon.beat()
    assert beacon.due == ["due"]
    assert beacon.scripts.lease_due(deadlines=keys.LEASE_DEADLINES, limit=REAP_BATCH) == ["due"]
    beacon.reap()  # its record is gone (expired): nothing to judge, the entry dropped
    assert db.zrange(keys.LEASE_DEADLINES, 0, -1) == ["later"]


def test_a_stopping_worker_takes_the_heartbeat_only_if_it_was_the_host_last(
        db: redis.Redis, beacon: HostBeacon) -> None:
    beacon.beat()
    workers = keys.host_workers(HOST)
    db.zadd(workers, {"h1:other:2": time.time() + 30})  # another live worker of h1
    assert withdraw(beacon) == 0
    assert db.exists(keys.host_heartbeat(HOST))
    assert db.zrange(workers, 0, -1) == ["h1:other:2"]
    db.zadd(workers, {"h1:other:2": time.time() - 1})  # it lapsed (killed)
    assert withdraw(beacon) == 1
    assert not db.exists(keys.host_heartbeat(HOST)) and not db.exists(workers)
