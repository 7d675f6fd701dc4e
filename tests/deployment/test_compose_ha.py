"""The compose HA profile, without Docker.

Compose's own check of the profile, then its Redis and Sentinel commands run as
real processes with the configuration files scripts/make-secrets.sh renders
(masterauth of the ``replicator`` user, Sentinel's auth of the ``sentinel``
user): the primary is killed with SIGKILL, the sentinels promote the replica,
the workers' sentinel URL reaches it, and the old primary rejoins as a replica.
Only what the compose network gives for free is moved: names become 127.0.0.1,
ports are free ones, /data and /run/secrets are directories of the test.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from api import exporter
from api.protocol import keys
from api.settings import Settings
from tests.deployment.compose_files import (
    COMPOSE,
    command_argv,
    in_sandbox,
    load_yaml_text,
    process_texts,
    service_env,
)
from workers.devtools.sandbox import REPO_ROOT, free_port, stop_process_group, wait_until

HA_SERVICES = {"redis-primary", "redis-replica", "sentinel-1", "sentinel-2", "sentinel-3",
               "worker-a-ha", "worker-b-ha", "flower-ha", "exporter-ha"}
SENTINELS = ("sentinel-1", "sentinel-2", "sentinel-3")
FOLLOWERS = ("worker-a-ha", "worker-b-ha", "flower-ha")
MASTER = "vmtask"


@pytest.mark.skipif(shutil.which("docker-compose") is None,
                    reason="docker-compose (Debian's, v1) is not installed: scripts/bootstrap.sh")
def test_docker_compose_accepts_the_ha_profile(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(["docker-compose", "--project-directory", str(REPO_ROOT), "-f",
                           str(COMPOSE), "--profile", "ha", "config"], capture_output=True,
                          text=True, env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    services = load_yaml_text(done.stdout)["services"]
    assert {name for name, s in services.items() if s.get("profiles")} == HA_SERVICES
    assert all(services[name]["profiles"] == ["ha"] for name in HA_SERVICES)
    for name in FOLLOWERS:
        service = services[name]
        environment = service["environment"]
        url = environment["VMTASK_REDIS_URL"]
        assert url.split(";") == ["sentinel://worker@sentinel-1:26379",
                                  "sentinel://sentinel-2:26379", "sentinel://sentinel-3:26379"]
        assert environment["VMTASK_REDIS_SENTINEL_MASTER"] == MASTER
        assert environment["VMTASK_REDIS_PASSWORD_FILE"] == "/run/secrets/redis_worker_password"
        # Started by name with their dependencies, they never pull in the single redis.
        assert set(service["depends_on"]) == set(SENTINELS)
    # The exporter follows the primary too, as the read-only "exporter" user, and is
    # the single stack's exporter otherwise (command, port, health check, hardening).
    ha_exporter, single = services["exporter-ha"], services["exporter"]
    assert ha_exporter["environment"]["VMTASK_REDIS_URL"].split(";") == [
        "sentinel://exporter@sentinel-1:26379", "sentinel://sentinel-2:26379",
        "sentinel://sentinel-3:26379"]
    assert ha_exporter["environment"]["VMTASK_REDIS_SENTINEL_MASTER"] == MASTER
    assert ha_exporter["environment"]["VMTASK_REDIS_PASSWORD_FILE"] == \
        "/run/secrets/redis_exporter_password"
    assert set(ha_exporter["depends_on"]) == set(SENTINELS)
    for key in ("command", "ports", "healthcheck", "cap_drop", "security_opt", "secrets",
                "mem_limit", "read_only", "user"):
        assert ha_exporter.get(key) == single.get(key), key
    for name in ("redis-primary", "redis-replica", *SENTINELS):
        assert "ports" not in services[name], f"{name} must stay on the compose network"
    assert set(services["redis-replica"]["depends_on"]) == {"redis-primary"}


class Node:
    """One compose Redis or Sentinel command as a real process."""

    def __init__(self, argv: list[str], directory: Path) -> None:
        self.argv = argv
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Node:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.argv, cwd=self.directory, start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, grace=5)
            self.proc = None


def data_node(compose: dict[str, Any], service: str, secrets_dir: Path, directory: Path,
              port: int, primary_port: int) -> Node:
    argv = [in_sandbox(arg, secrets_dir) for arg in command_argv(compose, service)]
    if "--replicaof" in argv:  # redis-primary 6379 on the compose network
        at = argv.index("--replicaof")
        assert argv[at + 1:at + 3] == ["redis-primary", "6379"]
        argv[at + 1:at + 3] = ["127.0.0.1", str(primary_port)]
    # Each node announces its own service name (so the sentinels hold it once):
    # here, where names are 127.0.0.1, its address.
    at = argv.index("--replica-announce-ip")
    assert argv[at + 1] == service
    argv[at + 1] = "127.0.0.1"
    return Node([*argv, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--dir", str(directory), "--logfile", str(directory / "redis.log")],
                directory)


def sentinel_node(compose: dict[str, Any], service: str, secrets_dir: Path, directory: Path,
                  port: int, primary_port: int) -> Node:
    """The sentinel's shell command, its /data a directory here.  The copy it keeps
    there is the rendered secret with the primary's name and the port moved."""
    command = command_argv(compose, service)
    assert command[:2] == ["sh", "-c"]
    directory.mkdir(parents=True, exist_ok=True)
    rendered = (secrets_dir / "sentinel_conf").read_text()
    moved = (rendered.replace("redis-primary 6379", f"127.0.0.1 {primary_port}")
             .replace("port 26379", f"port {port}").replace("dir /data", f"dir {directory}"))
    assert moved.count(str(primary_port)) == 1 and f"port {port}" in moved
    (directory / "sentinel.conf").write_text(moved)
    script = in_sandbox(command[2], secrets_dir).replace("/data/", f"{directory}/")
    return Node(["sh", "-c", f"{script} --bind 127.0.0.1 --logfile {directory}/sentinel.log"],
                directory)


def admin(port: int, secrets_dir: Path) -> redis.Redis:
    password = (secrets_dir / "redis_admin_password").read_text().strip()
    return redis.Redis(host="127.0.0.1", port=port, username="admin", password=password,
                       socket_timeout=5, socket_connect_timeout=5, decode_responses=True)


def master_view(port: int) -> dict[str, str]:
    flat = redis.Redis(port=port, socket_timeout=5, decode_responses=True).execute_command(
        "SENTINEL", "MASTER", MASTER)
    return dict(zip(flat[::2], flat[1::2], strict=True))


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    started: list[Node] = []
    yield started
    for node in started:
        node.stop()


@pytest.mark.slow
def test_the_profiles_redis_and_sentinels_fail_over_with_the_rendered_configs(
    compose: dict[str, Any], secrets_dir: Path, secret_values: dict[str, str],
    tmp_path: Path, nodes: list[Node],
) -> None:
    primary_port, replica_port = free_port(), free_port()
    sentinel_ports = [free_port() for _ in SENTINELS]
    primary = data_node(compose, "redis-primary", secrets_dir, tmp_path / "primary",
                        primary_port, primary_port)
    nodes.append(primary.start())

    def answers(port: int) -> bool:
        try:
            return bool(admin(port, secrets_dir).ping())
        except redis.ConnectionError:
            return False

    wait_until(lambda: answers(primary_port), 20, "the primary")
    nodes.append(data_node(compose, "redis-replica", secrets_dir, tmp_path / "replica",
                           replica_port, primary_port).start())
    replica = admin(replica_port, secrets_dir)
    # The replica logs in as "replicator" with the rendered masterauth.
    wait_until(lambda: answers(replica_port) and replica.info("replication").get(
        "master_link_status") == "up", 30, "the replica to sync")
    for service, port in zip(SENTINELS, sentinel_ports, strict=True):
        nodes.append(sentinel_node(compose, service, secrets_dir, tmp_path / service, port,
                                   primary_port).start())

    def sentinels_agree() -> bool:
        try:
            views = [master_view(port) for port in sentinel_ports]
        except redis.RedisError:
            return False
        return all(v.get("num-other-sentinels") == "2" and v.get("num-slaves") == "1"
                   for v in views)

    wait_until(sentinels_agree, 60, "the sentinels to find each other and the replica",
               interval=0.2)
    for node in nodes:
        assert node.proc is not None
        text = process_texts(node.proc.pid)
        for name, value in secret_values.items():
            assert value not in text, f"{name} shows in a process's argv or environment"
    first = admin(primary_port, secrets_dir)
    first.set("vmtask:ha-before", "kept")
    assert first.wait(1, 2000) == 1

    primary.kill()
    wait_until(lambda: master_view(sentinel_ports[0]).get("port") == str(replica_port), 60,
               "the sentinels to promote the replica", interval=0.2)
    wait_until(lambda: replica.info("replication").get("role") == "master", 20,
               "the replica to take the role")
    # Sentinel's promotion (MULTI, REPLICAOF NO ONE, CONFIG REWRITE, CLIENT KILL,
    # EXEC) ran as the "sentinel" user: an ACL refusal would have aborted it.
    assert [e for e in replica.acl_log() if e.get("username") in ("sentinel", "replicator")] \
        == []

    # The workers' URL, its names moved to the sentinels here, reaches the new primary.
    environment = {name: in_sandbox(value, secrets_dir)
                   for name, value in service_env(compose, "worker-a-ha").items()}
    url = environment["VMTASK_REDIS_URL"]
    for service, port in zip(SENTINELS, sentinel_ports, strict=True):
        url = url.replace(f"{service}:26379", f"127.0.0.1:{port}")
    environment["VMTASK_REDIS_URL"] = url
    worker_view = Settings.from_env(environment).endpoint.client(5.0, decode_responses=True)
    assert worker_view.get("vmtask:ha-before") == "kept"
    worker_view.set("vmtask:ha-probe", "after")
    assert replica.get("vmtask:ha-probe") == "after"
    # So does the exporter's, as the read-only "exporter" user: a scrape of the new
    # primary that Redis refuses nothing of.
    environment = {name: in_sandbox(value, secrets_dir)
                   for name, value in service_env(compose, "exporter-ha").items()}
    url = environment["VMTASK_REDIS_URL"]
    for service, port in zip(SENTINELS, sentinel_ports, strict=True):
        url = url.replace(f"{service}:26379", f"127.0.0.1:{port}")
    environment["VMTASK_REDIS_URL"] = url
    replica.sadd(keys.KNOWN_HOSTS, "ha-host")
    replica.set(keys.host_heartbeat("ha-host"), "{}")
    scraped = exporter.read(exporter.scrape_client(Settings.from_env(environment).endpoint,
                                                   5.0))
    assert scraped.hosts == ["ha-host"]
    assert [e for e in replica.acl_log() if e.get("username") == "exporter"] == []

    # The old primary comes back with its own command and becomes a replica.
    nodes.append(data_node(compose, "redis-primary", secrets_dir, tmp_path / "primary",
                           primary_port, primary_port).start())
    wait_until(lambda: answers(primary_port) and first.info("replication").get(
        "master_link_status") == "up", 60, "the old primary to rejoin as a replica",
        interval=0.2)
    assert first.get("vmtask:ha-probe") == "after"
