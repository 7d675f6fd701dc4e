"""Fixtures: a private redis-server and real celery workers for hosts alpha and beta."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from api import VirtualServer
from workers.devtools.sandbox import RedisServer, WorkerProcess


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vmtask")


@pytest.fixture(scope="session")
def redis_server(session_dir: Path) -> Iterator[RedisServer]:
    server = RedisServer(session_dir / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def alpha(redis_server: RedisServer, session_dir: Path) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(redis_server.url, "alpha", session_dir / "alpha", session_dir,
                           concurrency=2).start()
    yield worker
    worker.stop()


@pytest.fixture(scope="session")
def beta(redis_server: RedisServer, session_dir: Path) -> Iterator[WorkerProcess]:
    """One pool process: tests use it to hold a task in the queue behind another."""
    worker = WorkerProcess(redis_server.url, "beta", session_dir / "beta", session_dir,
                           concurrency=1).start()
    yield worker
    worker.stop()


@pytest.fixture
def server(redis_server: RedisServer, alpha: WorkerProcess) -> Iterator[VirtualServer]:
    with VirtualServer(redis_server.url, host="alpha", poll_interval=0.5) as vs:
        yield vs


@pytest.fixture
def root(alpha: WorkerProcess) -> Path:
    """The alpha host's storage root, where tests put and inspect image files."""
    alpha.storage_root.mkdir(parents=True, exist_ok=True)
    return alpha.storage_root


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start private redis-servers and workers; all stopped at the end of the test."""
    started: list[RedisServer | WorkerProcess] = []

    def start(kind: str, **kwargs: Any) -> Any:
        if kind == "redis":
            process: RedisServer | WorkerProcess = RedisServer(
                tmp_path / f"redis{len(started)}", **kwargs).start()
        else:
            redis_url = kwargs.pop("redis_url")
            host = kwargs.pop("host")
            process = WorkerProcess(redis_url, host, tmp_path / f"storage-{host}", tmp_path,
                                    **kwargs).start()
        started.append(process)
        return process

    yield start
    for process in reversed(started):
        process.stop()
