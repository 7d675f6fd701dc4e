"""A Redis ACL that refuses the worker a command its start gate needs.

The worker's user lacks one command: ROLE (which the start gate sends, with WAIT,
whenever a replica must acknowledge the start; compose's HA profile shipped
without ``+role``), or HINCRBY (which the start gate's script runs after it has
marked the record STARTED).  The task must end with what happened, access denied
and the refused command or Redis's refusal, at once, not ThreadCrashError
"the worker stopped" a lease later.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from api import VirtualServer, VMTaskResult
from api.protocol import hresults
from workers.devtools.sandbox import RedisServer, WorkerProcess

ADMIN, WORKER = secrets.token_hex(8), secrets.token_hex(8)
LEASE_SECONDS = 3


@pytest.fixture(params=["role", "hincrby"])
def refused(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """(refused command, producer URL, worker log) with a worker serving host 'denied'."""
    command = str(request.param)
    acl = tmp_path / "users.acl"
    acl.write_text(f"user default off\n"
                   f"user admin on >{ADMIN} ~* &* +@all\n"
                   f"user worker on >{WORKER} ~* &* +@all -{command}\n")
    server = RedisServer(tmp_path / "redis", acl_file=acl, username="admin",
                         password=ADMIN).start()
    worker: WorkerProcess | None = None
    try:
        worker = WorkerProcess(server.url_for("worker", WORKER), "denied", tmp_path / "storage",
                               tmp_path, concurrency=1,
                               env={"VMTASK_REDIS_WAIT_REPLICAS": "1",
                                    "VMTASK_REDIS_WAIT_MS": "50",
                                    "VMTASK_LEASE_SECONDS": str(LEASE_SECONDS)}).start()
        yield command, server.url_for("admin", ADMIN), str(worker.log_path)
    finally:
        if worker is not None:
            worker.stop()
        server.stop()


def test_a_command_refused_at_the_start_gate_is_recorded_as_access_denied(
        refused: tuple[str, str, str]) -> None:
    command, url, log_path = refused
    with VirtualServer(url, host="denied", poll_interval=0.2) as server:
        task = server.ping(duration_ms=10)
        # Well inside the lease: the worker records it, nobody has to judge a crash.
        assert task.wait_for_completion(LEASE_SECONDS * 1000 - 500), (
            f"not ended before its lease could lapse: {task.snapshot()}\n"
            + Path(log_path).read_text(errors="replace")[-3000:])
        snap = task.snapshot()
        assert snap.result is VMTaskResult.UnexpectedError, snap
        assert snap.error == hresults.ACCESS_DENIED, hresults.format_hresult(snap.error)
        assert "refused" in snap.error_description and "worker" in snap.error_description
        if command == "role":  # Redis names the command it refuses outside a script
            assert "'role'" in snap.error_description, snap.error_description
        # A task that never ran says so.
        assert "never ran" in snap.error_description, snap.error_description
