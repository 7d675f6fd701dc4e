"""Compose secrets: where every password lives, and scripts/make-secrets.sh.

No password may reach what `docker inspect` shows (a service's command,
environment, healthcheck, entrypoint, labels) or what `ps` shows (argv): every
service reads its passwords from files mounted under /run/secrets.  The script
that makes those files is run here, and what it makes is used by a real
redis-server, a real worker and a real producer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from api import VirtualServer, VMTaskResult, errors
from tests.deployment.compose_files import (
    DOCKERFILE,
    PLACEHOLDER,
    SECRET_NAME,
    SECRETS_MOUNT,
    ComposeRedis,
    make_secrets,
    read_secrets,
)
from workers.devtools.sandbox import REPO_ROOT, WorkerProcess

# What docker inspect shows of a service, besides its image.
INSPECTED = ("command", "entrypoint", "environment", "healthcheck", "labels")
# Who reads each file inside the containers (see scripts/make-secrets.sh).
OWNERS = {"redis_users_acl": 999, "redis_admin_password": 999, "redis_worker_password": 10001,
          "redis_exporter_password": 10001, "flower_basic_auth": 10001, "redis_ha_conf": 999,
          "sentinel_conf": 999}
# Made, but mounted by no service: the producer's, and the two the HA profile's
# configuration files are rendered from.
UNMOUNTED = {"redis_producer_password", "redis_replicator_password", "redis_sentinel_password"}
SECRET_HOST = "secrethost"
TEMPLATE = REPO_ROOT / "deploy" / "redis" / "users.acl.template"


def mounted_secrets(text: str) -> set[str]:
    return set(re.findall(re.escape(SECRETS_MOUNT) + r"([A-Za-z0-9_.-]+)", text))


def test_no_secret_in_any_inspected_field(
    compose: dict[str, Any], secret_values: dict[str, str],
) -> None:
    for name, service in compose["services"].items():
        inspected = json.dumps({field: service.get(field) for field in INSPECTED})
        for value in secret_values.values():
            assert value not in inspected
        environment = service.get("environment") or {}
        for variable, value in environment.items():
            if SECRET_NAME.search(variable):
                assert variable.endswith("_FILE") and str(value).startswith(SECRETS_MOUNT), (
                    f"{name}: {variable} holds a secret, not a secret file")
            for url in re.findall(r"[a-z]+://\S+", str(value)):
                assert urlsplit(url).password is None, f"{name}: {variable}: password in URL"
        argv = json.dumps(service.get("command"))
        for flag in ("--requirepass", "--masterauth", "--pass", "-a", "--basic-auth",
                     "--basic_auth", "--password"):
            assert f'"{flag}"' not in argv and f'"{flag}=' not in argv, f"{name}: {flag}"
        # A shell healthcheck may set a variable for one command, from a file only.
        for test in (service.get("healthcheck") or {}).get("test", [])[1:]:
            for variable, value in re.findall(r'\b([A-Z_]+)=("[^"]*"|\S+)', test):
                if SECRET_NAME.search(variable):
                    assert re.fullmatch(r'"\$\(cat /run/secrets/[a-z_]+\)"', value), (
                        f"{name}: healthcheck sets {variable} from {value}")


def test_every_secret_a_service_reads_is_mounted_and_declared(
    raw_compose: dict[str, Any], compose: dict[str, Any],
) -> None:
    declared = compose["secrets"]
    used: set[str] = set()
    for name, service in compose["services"].items():
        mounted = set(service.get("secrets", []))
        assert all(isinstance(secret, str) for secret in mounted), "short syntax only"
        read = mounted_secrets(json.dumps({field: service.get(field) for field in INSPECTED}))
        assert read == mounted, f"{name} mounts {sorted(mounted)} but reads {sorted(read)}"
        assert mounted <= set(declared), f"{name}: undeclared {mounted - set(declared)}"
        used |= mounted
    assert used == set(declared), f"declared, never used: {set(declared) - used}"
    for name, secret in declared.items():
        assert secret == {"file": f"./secrets/{name}"}, name
    assert set(OWNERS) == set(declared)
    assert "secrets/" in (REPO_ROOT / ".gitignore").read_text().split()


def test_make_secrets_writes_0600_files_owned_by_their_readers(
    compose: dict[str, Any], secrets_dir: Path, secret_values: dict[str, str],
) -> None:
    files = {path.name: path.stat() for path in secrets_dir.iterdir()}
    assert set(files) == {*compose["secrets"], *UNMOUNTED}
    assert stat.S_IMODE(secrets_dir.stat().st_mode) == 0o700
    for name, info in files.items():
        assert stat.S_IMODE(info.st_mode) == 0o600, name
        if os.geteuid() == 0:
            assert info.st_uid == OWNERS.get(name, int(os.environ.get("SUDO_UID", 0))), name
    # The image's user is the one the script gives the workers' files to.
    assert "--uid 10001" in DOCKERFILE.read_text()
    for name in ("redis_producer_password", "redis_worker_password", "redis_exporter_password",
                 "redis_admin_password",
                 "redis_replicator_password", "redis_sentinel_password"):
        assert re.fullmatch(r"[0-9a-f]{64}", secret_values[name]), name
    assert re.fullmatch(r"admin:[0-9a-f]{64}", secret_values["flower_basic_auth"])
    assert len(set(secret_values.values())) == len(secret_values), "a password is reused"


def test_make_secrets_renders_the_template_with_the_password_hashes(
    secrets_dir: Path, secret_values: dict[str, str],
) -> None:
    rendered = (secrets_dir / "redis_users_acl").read_text().splitlines()
    template = [line for line in TEMPLATE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert len(rendered) == len(template)
    for user in ("producer", "worker", "exporter", "admin", "replicator", "sentinel"):
        digest = hashlib.sha256(secret_values[f"redis_{user}_password"].encode()).hexdigest()
        marker = f"@{user.upper()}_SHA256@"
        expected = next(line for line in template if marker in line).replace(marker, digest)
        assert expected in rendered
    text = "\n".join(rendered)
    for value in secret_values.values():
        assert value not in text, "a password in clear in the ACL file"


def test_make_secrets_keeps_existing_passwords_and_refuses_placeholders(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "secrets"
    assert make_secrets(directory).returncode == 0
    first, acl = read_secrets(directory), (directory / "redis_users_acl").read_text()
    again = make_secrets(directory)
    assert again.returncode == 0, again.stderr
    assert read_secrets(directory) == first
    assert (directory / "redis_users_acl").read_text() == acl
    # Deleting a file rotates that password, and only that one.
    (directory / "redis_admin_password").unlink()
    assert make_secrets(directory).returncode == 0
    rotated = read_secrets(directory)
    assert rotated["redis_admin_password"] != first["redis_admin_password"]
    assert {k: v for k, v in rotated.items() if k != "redis_admin_password"} == {
        k: v for k, v in first.items() if k != "redis_admin_password"}
    for name, content in (("redis_worker_password", f"{PLACEHOLDER}-worker\n"),
                          ("flower_basic_auth", f"admin:{PLACEHOLDER}\n"),
                          ("flower_basic_auth", "no-colon\n"),
                          ("redis_producer_password", "\n")):
        saved = (directory / name).read_text()
        (directory / name).write_text(content)
        refused = make_secrets(directory)
        assert refused.returncode != 0, (name, content)
        assert name in refused.stderr
        (directory / name).write_text(saved)


@pytest.fixture(scope="module")
def made_stack(compose: dict[str, Any], secrets_dir: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeRedis]:
    """The compose redis-server and a real worker, both using the made secret files."""
    root = tmp_path_factory.mktemp("made")
    server = ComposeRedis(compose, secrets_dir, root / "redis").start()
    worker = WorkerProcess(server.url("worker"), SECRET_HOST, root / "storage", root,
                           env={"VMTASK_REDIS_PASSWORD_FILE":
                                str(secrets_dir / "redis_worker_password")})
    try:
        worker.start()
        yield server
    finally:
        worker.stop()
        server.stop()


def test_made_secrets_let_a_real_worker_and_producer_in_and_nobody_else(
    made_stack: ComposeRedis, secrets_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import redis

    # The worker is in: WorkerProcess.start waited for its heartbeat, read through
    # the worker user.  The producer reads the hosts through its own user and file.
    monkeypatch.setenv("VMTASK_REDIS_PASSWORD_FILE", str(secrets_dir / "redis_producer_password"))
    with VirtualServer(made_stack.url("producer"), host=SECRET_HOST) as producer:
        assert SECRET_HOST in producer.hosts
    monkeypatch.setenv("VMTASK_REDIS_PASSWORD_FILE", str(secrets_dir / "redis_admin_password"))
    with VirtualServer(made_stack.url("worker"), host=SECRET_HOST) as wrong:
        with pytest.raises(errors.BrokerUnavailableError):
            wrong.hosts  # noqa: B018 - the admin password is not the worker's
    anonymous = redis.Redis(host="127.0.0.1", port=made_stack.port, socket_timeout=5)
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.get("vmtask:hosts")
    denied = [entry for entry in made_stack.admin().acl_log()
              if entry["username"] != "worker" or entry["reason"] != "auth"]
    assert denied == []


def test_the_producer_user_submits_a_task(
    made_stack: ComposeRedis, secrets_dir: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VMTASK_REDIS_PASSWORD_FILE", str(secrets_dir / "redis_producer_password"))
    with VirtualServer(made_stack.url("producer"), host=SECRET_HOST, poll_interval=0.5) as vs:
        task = vs.ping(duration_ms=50, steps=1)
        assert task.wait_for_completion(30_000) is True
        assert task.result is VMTaskResult.Success
