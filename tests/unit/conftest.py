"""Fixtures of the unit tests: one private redis-server per module, for the tests of
the Lua scripts, emptied before each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from workers.devtools.sandbox import RedisServer


@pytest.fixture(scope="module")
def lua_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("lua") / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def db(lua_redis: RedisServer) -> Iterator[redis.Redis]:
    """A client of the module's redis-server, which holds nothing when the test begins."""
    client = lua_redis.client()
    client.flushall()
    yield client
    client.close()
