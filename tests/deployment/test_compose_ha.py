"""The optional Redis high-availability profile of docker-compose.yml ("ha"):
a primary, a replica and three sentinels, and docker-compose.ha.yml, which points
the workers and Flower at the sentinels.  Checked without Docker, against the
real settings code; the sentinels' start-up script is run to see the file it writes.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from api.settings import Settings
from tests.deployment.test_deployment import (
    ENV_EXAMPLE,
    REFERENCE,
    SERVICES,
    command_argv,
    compose,
    dotenv,
    load_yaml,
    raw_compose,
    references,
    resolve,
    service_env,
    urlsplit,
)
from workers.devtools.sandbox import REPO_ROOT

__all__ = ["compose", "dotenv", "raw_compose"]  # fixtures, used by name

COMPOSE_HA = REPO_ROOT / "docker-compose.ha.yml"
HA_SERVICES = {"redis-ha-primary", "redis-ha-replica", "sentinel-1", "sentinel-2", "sentinel-3"}
SENTINELS = ("sentinel-1", "sentinel-2", "sentinel-3")


@pytest.fixture(scope="module")
def override(dotenv: dict[str, str]) -> dict[str, Any]:
    resolved: dict[str, Any] = resolve(load_yaml(COMPOSE_HA), dotenv)
    return resolved


def sentinel_config(compose: dict[str, Any], service: str, tmp_path: Path,
                    password: str) -> list[str]:
    """The sentinel's start-up script, run with /data in a temporary folder and
    ``cat`` in place of redis-server: the configuration it would start with."""
    argv = command_argv(compose, service)
    assert argv[:2] == ["sh", "-c"], argv
    script = argv[2].replace("$$", "$").replace("/data", str(tmp_path))
    script = script.replace("exec redis-server", "exec cat").replace(" --sentinel", "")
    env = {"PATH": "/usr/bin:/bin", **service_env(compose, service), "REDIS_PASSWORD": password}
    out = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True,
                         check=True)
    assert "--sentinel" in argv[2]
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def test_the_ha_profile_adds_a_primary_a_replica_and_three_sentinels(
        compose: dict[str, Any]) -> None:
    services = compose["services"]
    profiled = {name for name, s in services.items() if s.get("profiles")}
    assert profiled == HA_SERVICES
    assert all(services[name]["profiles"] == ["ha"] for name in HA_SERVICES)
    assert not SERVICES & HA_SERVICES


def test_the_redis_nodes_replicate_with_passwords_and_keep_an_aof(
        compose: dict[str, Any], dotenv: dict[str, str]) -> None:
    password = dotenv["REDIS_PASSWORD"]
    for name in ("redis-ha-primary", "redis-ha-replica"):
        argv = command_argv(compose, name)
        options = dict(zip(argv[1::2], argv[2::2], strict=False))
        assert options["--appendonly"] == "yes"
        # masterauth on both: after a failover the old primary rejoins as a replica.
        assert options["--requirepass"] == options["--masterauth"] == password
        assert options["--replica-announce-ip"] == name
    replica = command_argv(compose, "redis-ha-replica")
    index = replica.index("--replicaof")
    assert replica[index + 1:index + 3] == ["redis-ha-primary", "6379"]


@pytest.mark.parametrize("service", SENTINELS)
def test_each_sentinel_watches_the_primary_with_a_quorum_of_two(
        compose: dict[str, Any], override: dict[str, Any], dotenv: dict[str, str],
        service: str, tmp_path: Path) -> None:
    lines = sentinel_config(compose, service, tmp_path, dotenv["REDIS_PASSWORD"])
    master = service_env(override, "worker-a")["VMTASK_REDIS_SENTINEL_MASTER"]
    assert f"sentinel monitor {master} redis-ha-primary 6379 2" in lines
    assert f"sentinel auth-pass {master} {dotenv['REDIS_PASSWORD']}" in lines
    assert f"sentinel announce-ip {service}" in lines
    assert "port 26379" in lines and "sentinel resolve-hostnames yes" in lines
    # The password is not on the command line: it comes from the environment.
    assert dotenv["REDIS_PASSWORD"] not in " ".join(command_argv(compose, service))


def test_the_override_points_workers_and_flower_at_the_sentinels(
        compose: dict[str, Any], override: dict[str, Any], dotenv: dict[str, str]) -> None:
    assert set(override["services"]) == {"worker-a", "worker-b", "flower"}
    for service in ("worker-a", "worker-b", "flower"):
        env = {**service_env(compose, service), **service_env(override, service)}
        settings = Settings.from_env(env)
        target = settings.endpoint.sentinel
        assert target is not None
        assert target.sentinels == tuple((name, 26379) for name in SENTINELS)
        assert target.master == "vmtask"
        assert target.password == dotenv["REDIS_PASSWORD"]
        assert settings.endpoint.wait_replicas == 1
        if service != "flower":
            assert settings.host == service_env(compose, service)["VMTASK_HOST"]


def test_the_override_holds_no_literal_password() -> None:
    text = COMPOSE_HA.read_text()
    for url in text.split('"'):
        if url.startswith("sentinel://"):
            password = urlsplit(url.split(";")[0]).password
            assert password is not None and REFERENCE.fullmatch(password)
            assert references(url) == ["REDIS_PASSWORD"]
    assert ENV_EXAMPLE.exists()
