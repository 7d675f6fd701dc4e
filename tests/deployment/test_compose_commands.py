"""The compose commands, run as they are written, without Docker.

Each service's command and healthcheck run here verbatim, with only what a
container would provide moved: Redis's address, the storage root, and the
/run/secrets mount (a directory made by scripts/make-secrets.sh).  Redis runs
with the compose ACL file; the workers and Flower connect as its ``worker`` user
through their password file, a producer as ``producer`` through its own.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api import VirtualServer, VMTaskResult
from api.protocol import keys
from tests.deployment.compose_files import (
    STORAGE_ROOT,
    VENV_BIN,
    WORKERS,
    ComposeRedis,
    command_argv,
    healthcheck_shell,
    image_source,
    in_sandbox,
    isolated_env,
    process_texts,
    service_env,
    with_address,
)
from workers.devtools.sandbox import (
    REPO_ROOT,
    WorkerProcess,
    free_port,
    stop_process_group,
    wait_until,
)


@pytest.fixture(scope="module")
def compose_redis(compose: dict[str, Any], secrets_dir: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeRedis]:
    server = ComposeRedis(compose, secrets_dir, tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


def container_env(compose: dict[str, Any], service: str, secrets_dir: Path,
                  redis_port: int | None = None) -> dict[str, str]:
    """The service's environment with the secret mount, and Redis's address, moved."""
    env = {name: in_sandbox(value, secrets_dir)
           for name, value in service_env(compose, service).items()}
    if redis_port is not None:
        env["VMTASK_REDIS_URL"] = with_address(env["VMTASK_REDIS_URL"], "127.0.0.1", redis_port)
    return env


def no_secret_in(text: str, secret_values: dict[str, str]) -> None:
    for name, value in secret_values.items():
        assert value not in text, f"the secret {name} shows"
        assert value.rpartition(":")[2] not in text, f"the password of {name} shows"


# -- redis ---------------------------------------------------------------------------


def test_redis_starts_with_the_acl_secret_and_shows_no_password(
    compose_redis: ComposeRedis, secret_values: dict[str, str],
) -> None:
    admin = compose_redis.admin()
    assert admin.acl_whoami() == "admin"
    users = {rule.split()[1]: rule for rule in admin.acl_list()}
    assert set(users) == {"default", "producer", "worker", "exporter", "admin", "replicator",
                          "sentinel"}
    # On (see the template) but with no password and no nopass: nobody logs in as it.
    assert " on " in users["default"] + " "
    assert "nopass" not in users["default"] and "#" not in users["default"]
    assert compose_redis.proc is not None
    no_secret_in(process_texts(compose_redis.proc.pid), secret_values)


def test_redis_refuses_to_start_without_its_acl_file(
    compose: dict[str, Any], tmp_path: Path,
) -> None:
    server = ComposeRedis(compose, tmp_path / "no-secrets", tmp_path / "redis").start(wait=False)
    assert server.proc is not None
    assert server.proc.wait(timeout=20) != 0
    assert "Aborting Redis startup because of ACL errors" in server.log()
    assert "redis_users_acl" in server.log()


def test_redis_healthcheck_authenticates_without_the_password_in_argv_or_config(
    compose: dict[str, Any], compose_redis: ComposeRedis, secrets_dir: Path, tmp_path: Path,
) -> None:
    check = healthcheck_shell(compose, "redis")
    assert "/run/secrets/redis_admin_password" in check
    # Inside the container redis-cli's default address is the container's own Redis;
    # here it must be ours, never the machine's Redis on 6379.
    assert check.count("redis-cli ") == 1
    local = check.replace("redis-cli ", f"redis-cli -p {compose_redis.port} ")
    ok = subprocess.run(["sh", "-c", in_sandbox(local, secrets_dir)], env=isolated_env({}),
                        timeout=20, capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    wrong = tmp_path / "secrets"
    wrong.mkdir()
    (wrong / "redis_admin_password").write_text("wrong-password\n")
    bad = subprocess.run(["sh", "-c", in_sandbox(local, wrong)], env=isolated_env({}),
                         timeout=20, capture_output=True, check=False)
    assert bad.returncode != 0, "the healthcheck passes without the right password"


# -- the workers -----------------------------------------------------------------------


@pytest.mark.parametrize(("service", "host"), sorted(WORKERS.items()))
def test_worker_command_loads_the_workers_app_for_its_host(
    compose: dict[str, Any], secrets_dir: Path, secret_values: dict[str, str],
    service: str, host: str,
) -> None:
    argv = command_argv(compose, service)
    assert argv[:4] == ["celery", "-A", "workers", "worker"]
    assert argv[argv.index("--loglevel") + 1] == "INFO"
    assert argv[argv.index("-n") + 1] == f"vmtask-{host}@%h"
    probe = (
        "import json\n"
        "from workers import app\n"
        "settings = app.settings\n"
        "print(json.dumps({'queues': [q.name for q in app.conf.task_queues],\n"
        "  'default': app.conf.task_default_queue, 'host': settings.host,\n"
        "  'root': str(settings.storage_root), 'broker': app.conf.broker_url,\n"
        "  'events': app.conf.worker_send_task_events, 'accept': app.conf.accept_content,\n"
        "  'ping': 'vmtask.ping' in app.tasks}))\n"
    )
    environment = container_env(compose, service, secrets_dir)
    done = subprocess.run([sys.executable, "-c", probe], env=isolated_env(environment),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    # Long operations, and quick ones (also served by the host's control lane).
    assert loaded["queues"] == [keys.host_queue(host), keys.control_queue(host)] \
        == [f"host.{host}", f"host.{host}.control"]
    assert loaded["default"] == f"host.{host}"
    assert (loaded["host"], loaded["root"]) == (host, STORAGE_ROOT)
    # The password file's content joins the URL in memory, and only there.
    password = secret_values["redis_worker_password"]
    assert loaded["broker"] == f"redis://worker:{password}@redis:6379/0"
    assert loaded["events"] is True, "Flower needs task events"
    assert loaded["accept"] == ["json"]


@pytest.mark.parametrize(("service", "host"), sorted(WORKERS.items()))
def test_worker_command_runs_and_serves_its_host(
    compose: dict[str, Any], compose_redis: ComposeRedis, secrets_dir: Path,
    secret_values: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    service: str, host: str,
) -> None:
    """The compose command, verbatim, as Redis's worker user; a producer as producer."""
    admin = compose_redis.admin()
    admin.acl_log_reset()  # an earlier test's deliberate wrong password is logged there
    environment = container_env(compose, service, secrets_dir, compose_redis.port)
    environment.update(VMTASK_STORAGE_ROOT=str(tmp_path / "storage"),
                       HOSTNAME=socket.gethostname())  # Docker sets HOSTNAME; %h is it
    argv = command_argv(compose, service)
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(VENV_BIN / argv[0]), *argv[1:]], cwd=tmp_path, env=isolated_env(environment),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        def serving() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"worker exited:\n{log_path.read_text(errors='replace')}")
            beat = admin.get(keys.host_heartbeat(host))
            return beat is not None and json.loads(beat).get("pid") == proc.pid

        wait_until(serving, 60, f"the {service} command to serve {host}", interval=0.1)
        # A producer on the Docker host, with its own user and password file, sees it.
        monkeypatch.setenv("VMTASK_REDIS_PASSWORD_FILE",
                           str(secrets_dir / "redis_producer_password"))
        with VirtualServer(compose_redis.url("producer"), host=host) as producer:
            assert host in producer.hosts
        # The round trip goes through admin: the producer user cannot submit yet
        # (see test_compose_secrets.test_the_producer_user_submits_a_task).
        monkeypatch.setenv("VMTASK_REDIS_PASSWORD_FILE", str(secrets_dir / "redis_admin_password"))
        with VirtualServer(compose_redis.url("admin"), host=host, poll_interval=0.5) as server:
            task = server.ping(duration_ms=50, steps=1)
            assert task.wait_for_completion(20_000) is True
            assert task.result is VMTaskResult.Success
        health = subprocess.run(["sh", "-c", healthcheck_shell(compose, service)],
                                env=isolated_env(environment), cwd=tmp_path,
                                capture_output=True, text=True, timeout=60, check=False)
        assert health.returncode == 0, health.stdout + health.stderr
        # What `ps e` would show of the worker, its pool and control lane.
        no_secret_in(process_texts(proc.pid), secret_values)
    finally:
        stop_process_group(proc)
    no_secret_in(log_path.read_text(errors="replace"), secret_values)
    assert admin.acl_log() == [], "a compose user was refused a command"


def test_a_worker_with_a_placeholder_password_file_stops_with_a_clear_message(
    compose: dict[str, Any], tmp_path: Path,
) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "redis_worker_password").write_text("change-me-worker-password\n")
    environment = container_env(compose, "worker-a", secrets, free_port())
    argv = command_argv(compose, "worker-a")
    done = subprocess.run([str(VENV_BIN / argv[0]), *argv[1:]], cwd=tmp_path,
                          env=isolated_env(environment), capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode != 0
    assert "VMTASK_REDIS_PASSWORD_FILE" in done.stderr and "placeholder" in done.stderr


# -- Flower ----------------------------------------------------------------------------


def flower_argv(compose: dict[str, Any], port: int) -> list[str]:
    """Flower's compose command, its config file taken from where the image gets it."""
    argv = []
    for arg in command_argv(compose, "flower"):
        if arg.startswith("--conf="):
            arg = f"--conf={image_source(arg.split('=', 1)[1])}"
        elif arg.startswith("--port="):
            arg = f"--port={port}"
        elif arg.startswith("--address="):
            arg = "--address=127.0.0.1"
        argv.append(arg)
    return [str(VENV_BIN / argv[0]), *argv[1:]]


def http_get(url: str, credentials: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if credentials is not None:
        token = base64.b64encode(credentials.encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def test_flower_as_compose_starts_it_wants_the_secret_credentials(
    compose: dict[str, Any], compose_redis: ComposeRedis, secrets_dir: Path,
    secret_values: dict[str, str], tmp_path: Path,
) -> None:
    environment = container_env(compose, "flower", secrets_dir, compose_redis.port)
    worker = WorkerProcess(compose_redis.url("worker"), "flowerhost", tmp_path / "storage",
                           tmp_path, env={"VMTASK_REDIS_PASSWORD_FILE":
                                          environment["VMTASK_REDIS_PASSWORD_FILE"]}).start()
    port = free_port()
    log_path = tmp_path / "flower.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(flower_argv(compose, port), cwd=tmp_path,
                                env=isolated_env(environment), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    credentials = secret_values["flower_basic_auth"]
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"flower exited:\n{log_path.read_text(errors='replace')}")
            try:
                return http_get(f"{base}/healthcheck")[0] == 200
            except OSError:
                return False

        wait_until(up, 60, "Flower to answer", interval=0.2)
        assert http_get(f"{base}/")[0] == 401
        assert http_get(f"{base}/api/workers")[0] == 401
        user = credentials.partition(":")[0]
        assert http_get(f"{base}/", f"{user}:not-the-password")[0] == 401
        assert http_get(f"{base}/", credentials)[0] == 200
        # Flower reaches Redis as the worker user: it sees the worker.
        def sees_worker() -> bool:
            status, body = http_get(f"{base}/api/workers?refresh=1", credentials)
            return status == 200 and any("flowerhost" in name for name in json.loads(body))

        wait_until(sees_worker, 30, "Flower to list the worker", interval=0.5)
        # The compose healthcheck, pointed at this port.
        check = compose["services"]["flower"]["healthcheck"]["test"]
        assert check[0] == "CMD"
        health = subprocess.run([str(VENV_BIN / check[1]), *(a.replace(":5555", f":{port}")
                                                             for a in check[2:])],
                                capture_output=True, text=True, timeout=30, check=False)
        assert health.returncode == 0, health.stderr
        no_secret_in(process_texts(proc.pid), secret_values)
    finally:
        stop_process_group(proc)
        worker.stop()
    no_secret_in(log_path.read_text(errors="replace"), secret_values)


@pytest.mark.parametrize(("content", "message"), [
    (None, "cannot read the basic-auth secret"),
    ("", "is empty"),
    ("admin\n", "is not user:password"),
    ("admin:change-me-flower-password\n", "placeholder"),
])
def test_flower_without_real_credentials_refuses_to_start(
    compose: dict[str, Any], secrets_dir: Path, tmp_path: Path,
    content: str | None, message: str,
) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "redis_worker_password").write_text(
        (secrets_dir / "redis_worker_password").read_text())
    if content is not None:
        (secrets / "flower_basic_auth").write_text(content)
    environment = container_env(compose, "flower", secrets, free_port())
    done = subprocess.run(flower_argv(compose, free_port()), cwd=tmp_path,
                          env=isolated_env(environment), capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode != 0
    assert message in done.stderr, done.stderr
    assert "change-me-flower-password" not in done.stderr, "the message shows the secret"


# -- the metrics exporter -------------------------------------------------------------


def test_the_exporter_as_compose_starts_it_reads_redis_as_its_read_only_user(
    compose: dict[str, Any], compose_redis: ComposeRedis, secrets_dir: Path,
    secret_values: dict[str, str], tmp_path: Path,
) -> None:
    environment = container_env(compose, "exporter", secrets_dir, compose_redis.port)
    assert environment["VMTASK_REDIS_URL"].startswith("redis://exporter@")
    worker_env = container_env(compose, "worker-a", secrets_dir, compose_redis.port)
    worker = WorkerProcess(compose_redis.url("worker"), "exporterhost", tmp_path / "storage",
                           tmp_path, env={"VMTASK_REDIS_PASSWORD_FILE":
                                          worker_env["VMTASK_REDIS_PASSWORD_FILE"]}).start()
    port = free_port()
    argv = [arg.replace("0.0.0.0:9808", f"127.0.0.1:{port}")
            for arg in command_argv(compose, "exporter")]
    assert argv[:2] == ["vmtask", "exporter"]
    log_path = tmp_path / "exporter.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([str(VENV_BIN / argv[0]), *argv[1:]], cwd=tmp_path,
                                env=isolated_env(environment), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def scraped() -> str | None:
            if proc.poll() is not None:
                raise AssertionError(f"exporter exited:\n{log_path.read_text(errors='replace')}")
            try:
                status, body = http_get(f"http://127.0.0.1:{port}/metrics")
            except OSError:
                return None
            return body.decode() if status == 200 else None

        wait_until(lambda: scraped() is not None, 30, "the exporter to answer", interval=0.2)
        text = scraped() or ""
        assert "vmtask_up 1.0" in text, log_path.read_text(errors="replace")
        assert 'vmtask_host_up{host="exporterhost"} 1.0' in text
        assert 'vmtask_queue_length{host="exporterhost",lane="long"} 0.0' in text
        assert [e for e in compose_redis.admin().acl_log() if e["username"] == "exporter"] == []
        check = compose["services"]["exporter"]["healthcheck"]["test"]
        assert check[0] == "CMD"
        health = subprocess.run([str(VENV_BIN / check[1]), *(a.replace(":9808", f":{port}")
                                                             for a in check[2:])],
                                capture_output=True, text=True, timeout=30, check=False)
        assert health.returncode == 0, health.stderr
        no_secret_in(process_texts(proc.pid), secret_values)
    finally:
        stop_process_group(proc)
        worker.stop()
