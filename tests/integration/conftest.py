"""Fixtures more than one integration module uses. A module with its own cluster
overrides ``server`` (and the like) locally; everything shared lives here or in a plain
helper module (``tests/helpers.py``, ``tests/cli_runs.py``...), never in a test module."""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from api import VirtualServer, VMVMState
from tests.cli_runs import Cli, Run, run_cli
from tests.helpers import kill_leftover_qemu
from tests.netns import Network, skip_reason
from workers.devtools.sandbox import RedisServer, WorkerProcess
from workers.devtools.tinyguest import build_tiny_guest


@pytest.fixture
def cli(redis_server: RedisServer, alpha: WorkerProcess) -> Cli:
    """``vmtask`` against the session's Redis, as host alpha."""
    def call(*args: str, timeout: float = 180) -> Run:
        return run_cli("--url", redis_server.url, "--host", "alpha", *args, timeout=timeout)
    return call


@pytest.fixture
def unique(request: pytest.FixtureRequest) -> str:
    """A folder and VM name of this test alone across the session (modules share the
    alpha host's storage root): the test's name, clipped, and a digest of its id.
    Short, since QEMU's unix sockets live under the root (108-byte limit)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", request.node.name.removeprefix("test_"))
    digest = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:8]
    return f"{name[:24].strip('-.')}-{digest}"


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


@pytest.fixture(scope="module")
def vm_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, Path]]:
    """A module's own redis-server and base folder for VM tests."""
    # Short paths: QEMU's unix sockets live under the storage root (108-byte limit).
    base = Path(tmp_path_factory.mktemp("vm"))
    redis = RedisServer(base / "redis").start()
    yield redis, base
    redis.stop()


@pytest.fixture(scope="module")
def vmhost(vm_env: tuple[RedisServer, Path]) -> Iterator[WorkerProcess]:
    """Host vmhost with the tiny guest's kernel and initrds (a normal one, one whose
    shutdown fails, one whose agent has no file commands) under guest/."""
    redis, base = vm_env
    worker = WorkerProcess(redis.url, "vmhost", base / "root", base, concurrency=2,
                           env={"VMTASK_HEARTBEAT_SECONDS": "1"}).start()
    guest = build_tiny_guest()
    (base / "root" / "guest").mkdir(parents=True, exist_ok=True)
    shutil.copy(guest.kernel, base / "root" / "guest" / "vmlinuz")
    shutil.copy(guest.initrd, base / "root" / "guest" / "initrd.gz")
    # A guest whose /sbin/shutdown fails: its real agent refuses guest-shutdown.
    refusing = build_tiny_guest(shutdown_fails=True)
    shutil.copy(refusing.initrd, base / "root" / "guest" / "initrd-refuse.gz")
    # A guest whose agent has its file commands blocked: no boot id to read.
    no_boot_id = build_tiny_guest(blocked_commands=("guest-file-open",))
    shutil.copy(no_boot_id.initrd, base / "root" / "guest" / "initrd-noid.gz")
    yield worker
    worker.stop()
    kill_leftover_qemu(base / "root")


@pytest.fixture
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    """A fresh set of namespaces with a Redis on the bridge; add hosts to it."""
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    # Short: QEMU's unix sockets live under the storage roots.
    net = Network(tmp_path_factory.mktemp("ns"))
    try:
        net.create()
        net.start_redis()
        yield net
    finally:
        net.close()
