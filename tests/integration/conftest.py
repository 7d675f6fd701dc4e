"""Fixtures more than one integration module uses. A module with its own cluster
overrides ``server`` (and the like) locally; everything shared lives here or in a plain
helper module (``tests/helpers.py``, ``tests/cli_runs.py``...), never in a test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from api import VirtualServer, VMVMState
from tests.cli_runs import Cli, Run, run_cli
from workers.devtools.sandbox import RedisServer, WorkerProcess


@pytest.fixture
def cli(redis_server: RedisServer, alpha: WorkerProcess) -> Cli:
    """``vmtask`` against the session's Redis, as host alpha."""
    def call(*args: str, timeout: float = 180) -> Run:
        return run_cli("--url", redis_server.url, "--host", "alpha", *args, timeout=timeout)
    return call


@pytest.fixture
def both(redis_server: RedisServer, alpha: WorkerProcess, beta: WorkerProcess
         ) -> Iterator[VirtualServer]:
    """A client of the session's two hosts (alpha and beta both running), as alpha."""
    with VirtualServer(redis_server.url, host="alpha", poll_interval=0.2) as vs:
        yield vs


@pytest.fixture
def vm_name(request: pytest.FixtureRequest, server: VirtualServer) -> Iterator[str]:
    """A VM name for the test; whatever the test left of that VM is removed after it."""
    name: str = "cli-" + request.node.name.removeprefix("test_")[:30]
    yield name
    machine = server.find_virtual_machine(name)
    if machine is None:
        return
    if machine.state in (VMVMState.Running, VMVMState.Paused, VMVMState.Saved):
        machine.turn_off().wait_for_completion(60_000)
    machine.delete().wait_for_completion(60_000)
