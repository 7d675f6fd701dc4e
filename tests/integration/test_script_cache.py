"""Our Lua scripts run on a Redis that does not have them cached.

A new primary (after a failover, or a restart) has an empty script cache.
redis-py answers NOSCRIPT with SCRIPT LOAD and EVALSHA again: two commands that a
client following a failover may send to two different servers, so the second
fails with NOSCRIPT as well.  In a failover test a task's start or result was lost
that way.  Here SCRIPT LOAD is sent to another server on purpose, which is that
case made deterministic: each call must still run its script exactly once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis

from api.replication import pipelined
from api.scripts import register_script
from workers.devtools.sandbox import RedisServer

INCREMENT = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


@pytest.fixture
def split_client(spawn: Callable[..., Any]) -> tuple[redis.Redis, redis.Redis]:
    """A client of one server whose SCRIPT LOAD lands on another, and that other."""
    current: RedisServer = spawn("redis")
    elsewhere: RedisServer = spawn("redis")
    client = redis.Redis(port=current.port, decode_responses=True)
    other = redis.Redis(port=elsewhere.port, decode_responses=True)
    client.script_load = other.script_load  # type: ignore[method-assign]
    return client, other


def test_a_registered_script_runs_once_where_its_cache_is_empty(
        split_client: tuple[redis.Redis, redis.Redis]) -> None:
    client, other = split_client
    increment = register_script(client, INCREMENT)
    assert increment(keys=["counter"], args=[5]) == 5
    assert increment(keys=["counter"], args=[2]) == 7  # now cached where it ran
    assert client.get("counter") == "7"
    assert other.get("counter") is None
    client.script_flush()
    assert increment(keys=["counter"], args=[1]) == 8


def test_a_pipeline_of_scripts_runs_once_where_their_cache_is_empty(
        split_client: tuple[redis.Redis, redis.Redis]) -> None:
    client, _ = split_client
    increment = register_script(client, INCREMENT)
    other_script = register_script(client, "return redis.call('GET', KEYS[1])")

    def build(pipe: Any) -> None:
        pipe.evalsha(increment.sha, 1, "counter", 3)
        pipe.set("plain", "1")
        pipe.evalsha(other_script.sha, 1, "counter")

    assert pipelined(client, build, (increment, other_script)) == [3, True, "3"]
    # The failed first try ran nothing: NOSCRIPT fails the command, not the batch,
    # so the plain SET ran twice (harmless) and each script once.
    assert client.get("counter") == "3"
    assert client.script_exists(increment.sha, other_script.sha) == [True, True]
    assert pipelined(client, build, (increment, other_script)) == [6, True, "6"]
