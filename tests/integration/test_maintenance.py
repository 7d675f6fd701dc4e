"""Host maintenance: refusals before anything is queued, what shows it, and that it
outlives a worker killed -9 and a Redis restart (AOF, as the deployment runs it)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from api import VirtualServer, errors
from api.protocol import keys
from tests.cli_runs import run_cli
from workers.devtools.sandbox import wait_until

FAST = {"VMTASK_HEARTBEAT_SECONDS": "1", "VMTASK_LEASE_SECONDS": "3"}


def queued(server: VirtualServer, host: str) -> tuple[int, int]:
    """Messages on the host's lanes and tasks ever recorded: what a refusal must not add."""
    client = server.redis
    return (client.llen(keys.host_queue(host)) + client.llen(keys.control_queue(host)),
            client.zcard(keys.RECENT_TASKS))


@pytest.mark.slow
def test_maintenance_refuses_placement_and_survives_restarts(
        spawn: Callable[..., Any]) -> None:
    redis_server = spawn("redis", appendonly=True)
    # A move onto a host in maintenance: test_evacuation's refusals.
    alpha = spawn("worker", redis_url=redis_server.url, host="alpha", concurrency=1, env=FAST)
    server = VirtualServer(redis_server.url, host="alpha", poll_interval=0.2)
    off_vm = server.create_virtual_machine("mnt-a", memory_mb=64, network=None)

    assert run_cli("--url", redis_server.url, "hosts", "maintenance", "alpha", "on").code == 0
    assert server.host_status()["alpha"]["maintenance"] is True
    before = queued(server, "alpha")
    with pytest.raises(errors.HostUnavailableError, match="maintenance"):
        server.create_virtual_machine("mnt-new", memory_mb=64, network=None)
    with pytest.raises(errors.HostUnavailableError, match="maintenance"):
        off_vm.startup()
    assert queued(server, "alpha") == before
    assert server.find_virtual_machine("mnt-new") is None

    shown = json.loads(run_cli("--url", redis_server.url, "hosts", "--json").out)
    assert {row["host"]: row["maintenance"] for row in shown} == {"alpha": True}
    table = run_cli("--url", redis_server.url, "hosts").out
    assert "maintenance" in table

    # kill -9 of the worker, then a Redis restart: still in maintenance.
    alpha.kill()
    redis_server.stop()
    redis_server.start()
    alpha.start()
    wait_until(lambda: "alpha" in server.hosts, 30, "alpha back")
    assert server.host_status()["alpha"]["maintenance"] is True
    with pytest.raises(errors.HostUnavailableError, match="maintenance"):
        off_vm.startup()

    assert run_cli("--url", redis_server.url, "hosts", "maintenance", "alpha", "off").code == 0
    assert server.host_status()["alpha"]["maintenance"] is False
    server.create_virtual_machine("mnt-new", memory_mb=64, network=None)
    server.close()
    alpha.kill()  # a graceful stop costs seconds, and nothing is left to finish
