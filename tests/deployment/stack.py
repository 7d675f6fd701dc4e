"""The compose stack under a real Docker engine: a project directory and its commands.

`Stack` is an operator's checkout (the repository's files copied into a fresh
directory) with a ``.env`` that names the stand-in images, free ports, a unique
project name and ``COMPOSE_FILE`` with the test override
(`OVERRIDE`: short healthchecks, the quick-NXDOMAIN resolver, host-network
builds), so that the deployment page's own commands (``scripts/make-secrets.sh``,
``docker-compose up -d --build``...) run there verbatim.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.deployment.docker_engine import (
    CACHE_DIR,
    DOCKER_COMPOSE,
    PYTHON_IMAGE,
    REDIS_IMAGE,
    DockerEngine,
    NxdomainResolver,
    build_standins,
    cache_lock,
    host_address,
    install_missing_tools,
    run,
)
from workers.devtools.sandbox import REPO_ROOT, free_port, wait_until

IMAGE_SERVICES = ("worker-a", "worker-b", "flower", "exporter", "worker-a-ha", "worker-b-ha",
                  "flower-ha", "exporter-ha")
REDIS_SERVICES = ("redis", "redis-primary", "redis-replica")
SENTINELS = ("sentinel-1", "sentinel-2", "sentinel-3")


def override(resolver: str) -> dict[str, Any]:
    """The test's compose override: nothing a deployment would not also do."""
    services: dict[str, Any] = {}
    fast = {"interval": "1s", "start_period": "5s"}
    for name in REDIS_SERVICES + SENTINELS:
        services[name] = {"healthcheck": fast, "dns": [resolver]}
    for name in IMAGE_SERVICES:
        services[name] = {"build": {"network": "host"}, "dns": [resolver],
                          "healthcheck": {"interval": "3s", "start_period": "60s"}}
    services["flower"]["healthcheck"] = services["flower-ha"]["healthcheck"] = \
        services["exporter"]["healthcheck"] = services["exporter-ha"]["healthcheck"] = \
        {"interval": "2s", "start_period": "30s"}
    return {"services": services}


class Stack:
    def __init__(self, engine: DockerEngine, directory: Path, project: str,
                 resolver: str) -> None:
        self.engine = engine
        self.directory = directory
        self.project = project
        self.global_args: list[str] = []
        self.redis_port = free_port()
        self.flower_port = free_port()
        self.exporter_port = free_port()
        copy_checkout(directory)
        (directory / "docker-compose.test.yml").write_text(json.dumps(override(resolver),
                                                                      indent=1))
        (directory / ".env").write_text("\n".join([
            f"COMPOSE_PROJECT_NAME={project}",
            "COMPOSE_FILE=docker-compose.yml:docker-compose.test.yml",
            f"REDIS_PORT={self.redis_port}",
            f"FLOWER_PORT={self.flower_port}",
            f"EXPORTER_PORT={self.exporter_port}",
            f"REDIS_IMAGE={REDIS_IMAGE}",
            f"PYTHON_IMAGE={PYTHON_IMAGE}",
            "VMTASK_ACCEL=tcg",
            ""]))

    # -- commands, as the deployment page gives them ---------------------------------

    def shell(self, argv: list[str], timeout: float = 900, check: bool = True,
              ) -> subprocess.CompletedProcess[str]:
        return run(argv, env=self.engine.env, cwd=self.directory, timeout=timeout, check=check)

    def compose(self, *args: str, timeout: float = 900, check: bool = True,
                ) -> subprocess.CompletedProcess[str]:
        return self.shell([DOCKER_COMPOSE, *self.global_args, *args], timeout=timeout,
                          check=check)

    def container(self, service: str) -> str:
        ids = self.compose("ps", "-q", service).stdout.split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        return ids[0]

    def state(self, service: str) -> dict[str, Any]:
        inspected = self.engine.docker("inspect", self.container(service)).stdout
        state: dict[str, Any] = json.loads(inspected)[0]["State"]
        return state

    def health(self, service: str) -> str:
        state = self.state(service)
        return str(state.get("Health", {}).get("Status", state.get("Status")))

    def wait_healthy(self, services: tuple[str, ...], timeout: float) -> None:
        def healthy() -> bool:
            return all(self.health(name) == "healthy" for name in services)

        try:
            wait_until(healthy, timeout, f"{services} to be healthy", interval=1)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from exc

    def logs(self, *services: str) -> str:
        done = self.compose("logs", "--no-color", "--tail", "60", *services, check=False)
        return done.stdout[-12000:]

    def down(self) -> None:
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "5", timeout=300,
                     check=False)

    # -- a producer on the Docker host --------------------------------------------------

    def producer_env(self) -> dict[str, str]:
        env = {name: value for name, value in os.environ.items()
               if not name.startswith("VMTASK_")}
        env["VMTASK_REDIS_URL"] = f"redis://producer@127.0.0.1:{self.redis_port}/0"
        env["VMTASK_REDIS_PASSWORD_FILE"] = str(self.directory / "secrets"
                                                / "redis_producer_password")
        return env

    def producer_url(self) -> str:
        password = (self.directory / "secrets" / "redis_producer_password").read_text().strip()
        return f"redis://producer:{password}@127.0.0.1:{self.redis_port}/0"

    def vmtask(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """The CLI on the host, as the deployment page's producer recipe sets it up."""
        return subprocess.run([sys.executable, "-m", "api.cli", *args], env=self.producer_env(),
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                              check=False)


@pytest.fixture(scope="module")
def engine() -> Iterator[DockerEngine]:
    """The engine, its stand-in images and the quick resolver (held under the cache lock,
    which also keeps a second run's resolver off port 53 meanwhile).

    Per module, not per session: a session-scoped engine held the lock until its xdist
    worker had run every other test, and a Docker module scheduled on the other worker
    waited all that time (the whole suite ran on one worker)."""
    install_missing_tools()
    with cache_lock():
        docker = DockerEngine(CACHE_DIR / "docker").start()
        resolver: NxdomainResolver | None = None
        try:
            resolver = NxdomainResolver(host_address()).start()
            docker.resolver_address = resolver.address
            build_standins(docker)
            yield docker
        finally:
            if resolver is not None:
                resolver.stop()
            docker.stop()


@pytest.fixture
def stack(engine: DockerEngine, tmp_path: Path) -> Iterator[Stack]:
    project = f"vmtdt{os.getpid()}x{int(time.time()) % 100000}"
    made = Stack(engine, tmp_path / "vmtask", project, engine.resolver_address)
    try:
        yield made
    finally:
        made.down()


def copy_checkout(directory: Path) -> None:
    """The repository's files (tracked, and new ones git does not ignore): a clone."""
    listed = run(["git", "-C", str(REPO_ROOT), "ls-files", "-z", "--cached", "--others",
                  "--exclude-standard"]).stdout
    for name in filter(None, listed.split("\0")):
        source = REPO_ROOT / name
        if not source.is_file():
            continue
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
