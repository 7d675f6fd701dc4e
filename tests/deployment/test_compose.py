"""docker-compose.yml, its KVM override and .env.example, read as Compose reads them.

Each service's settings are checked against the code that will run them:
`Settings.from_env` reads the workers' and Flower's environment (with the secret
files of scripts/make-secrets.sh where Compose mounts /run/secrets).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from api.settings import ACCELERATORS, Settings
from tests.deployment.compose_files import (
    COMPOSE,
    COMPOSE_KVM,
    COMPOSE_OWN_VARIABLES,
    DOCKERFILE,
    ENV_EXAMPLE,
    SECRET_NAME,
    SECRETS_MOUNT,
    SERVICES,
    STORAGE_ROOT,
    WORKERS,
    RecordingEnv,
    command_argv,
    in_sandbox,
    load_yaml,
    load_yaml_text,
    parse_env_file,
    references,
    resolve,
    secret_looking,
    service_env,
    strings,
)
from workers.devtools.sandbox import REPO_ROOT

# -- .env.example ------------------------------------------------------------------


def test_env_example_documents_every_variable_the_compose_files_use() -> None:
    active, commented = parse_env_file(ENV_EXAMPLE)
    used: dict[str, str] = {}
    for path in (COMPOSE, COMPOSE_KVM):
        for where, text in strings(load_yaml(path)):
            for name in references(text):
                used.setdefault(name, f"{path.name}: {where}")
    assert used, "the compose files use no variable at all"
    undocumented = {name: where for name, where in used.items()
                    if name not in active and name not in commented}
    assert not undocumented, f"used in compose but not in .env.example: {undocumented}"
    unused = set(active) | set(commented)
    unused -= set(used) | COMPOSE_OWN_VARIABLES
    assert not unused, f".env.example documents variables nothing uses: {sorted(unused)}"


def test_env_example_holds_no_secret() -> None:
    """Passwords are compose secrets now: .env.example has none, not even a placeholder."""
    active, commented = parse_env_file(ENV_EXAMPLE)
    values = {**commented, **active}
    assert not [name for name in values if SECRET_NAME.search(name)]
    # Nothing else that looks like key material, anywhere (comments included).
    assert not [line for line in ENV_EXAMPLE.read_text().splitlines() if secret_looking(line)]
    # ... and that detector does flag real-looking values.
    assert secret_looking("REDIS_PASSWORD=9f86d081884c7d659a2feaa0c55ad015")
    assert secret_looking("# FLOWER_PASSWORD=Vq3xL9pT2mZk8RwB4nHy")
    assert not secret_looking("REDIS_PASSWORD=change-me-redis-password")


# -- docker-compose.yml -------------------------------------------------------------


def test_compose_defines_redis_two_worker_hosts_and_flower(compose: dict[str, Any]) -> None:
    services = compose["services"]
    # Services of an opt-in profile (test_compose_ha) are not started by default.
    assert {name for name, s in services.items() if not s.get("profiles")} == SERVICES
    images = {services[name]["image"] for name in ("worker-a", "worker-b", "flower")}
    assert len(images) == 1, f"the workers and Flower should share one image: {images}"
    for name in ("worker-a", "worker-b", "flower"):
        build = services[name]["build"]
        assert (REPO_ROOT / build["context"]).resolve() == REPO_ROOT
        assert (REPO_ROOT / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_redis_keeps_an_append_only_file_and_takes_its_users_from_a_secret(
    raw_compose: dict[str, Any], compose: dict[str, Any]
) -> None:
    raw, redis_service = raw_compose["services"]["redis"], compose["services"]["redis"]
    # A pinned release (major.minor.patch), never a floating tag such as redis:7.
    assert re.fullmatch(r"redis:7\.\d+\.\d+(-[a-z0-9]+)?", redis_service["image"])
    argv = command_argv(compose, "redis")
    assert argv[0] == "redis-server"
    assert argv[argv.index("--appendonly") + 1] == "yes"
    assert argv[argv.index("--aclfile") + 1] == f"{SECRETS_MOUNT}redis_users_acl"
    assert "redis_users_acl" in redis_service["secrets"]
    assert "--requirepass" not in argv and "environment" not in redis_service
    volume, _, target = redis_service["volumes"][0].partition(":")
    assert target == "/data" and volume in compose["volumes"], "AOF must live in a volume"
    assert "-a " not in str(raw["healthcheck"]), "the healthcheck must not put it in argv"


def sandboxed_env(compose: dict[str, Any], service: str, secrets_dir: Path) -> dict[str, str]:
    return {name: in_sandbox(value, secrets_dir)
            for name, value in service_env(compose, service).items()}


@pytest.mark.parametrize(("service", "host"), sorted(WORKERS.items()))
def test_worker_environment_is_what_settings_reads(
    compose: dict[str, Any], secrets_dir: Path, secret_values: dict[str, str],
    service: str, host: str,
) -> None:
    environment = sandboxed_env(compose, service, secrets_dir)
    recording = RecordingEnv(environment)
    settings = Settings.from_env(recording)
    vmtask_vars = {name for name in environment if name.startswith("VMTASK_")}
    assert vmtask_vars == {"VMTASK_REDIS_URL", "VMTASK_REDIS_PASSWORD_FILE", "VMTASK_HOST",
                           "VMTASK_STORAGE_ROOT", "VMTASK_ACCEL", "VMTASK_ADVERTISE_ADDRESS"}
    assert vmtask_vars <= recording.read, (
        f"set in compose but never read by Settings.from_env: {vmtask_vars - recording.read}")
    assert settings.host == host
    # Other hosts reach its transfers by its service name on the compose network.
    assert settings.advertise_address == service
    assert settings.storage_root == Path(STORAGE_ROOT)
    assert settings.accel == "auto" and settings.accel in ACCELERATORS
    # The URL in compose has a user and no password; the one in memory has both.
    given = urlsplit(service_env(compose, service)["VMTASK_REDIS_URL"])
    assert (given.username, given.password) == ("worker", None)
    url = urlsplit(settings.endpoint.url)
    assert (url.scheme, url.hostname, url.port, url.path) == ("redis", "redis", 6379, "/0")
    assert (url.username, url.password) == ("worker", secret_values["redis_worker_password"])
    assert "redis_worker_password" in compose["services"][service]["secrets"]
    # The storage root is this host's own named volume.
    mounts = {target: source for source, target, *_ in
              (item.split(":") for item in compose["services"][service]["volumes"])}
    assert mounts[STORAGE_ROOT] in compose["volumes"]


def test_each_host_has_its_own_storage_volume(compose: dict[str, Any]) -> None:
    volumes = [compose["services"][service]["volumes"] for service in WORKERS]
    sources = [next(v.split(":")[0] for v in vs if v.endswith(":" + STORAGE_ROOT))
               for vs in volumes]
    assert len(set(sources)) == len(WORKERS), sources


def test_flower_takes_basic_auth_and_its_redis_password_from_secret_files(
    compose: dict[str, Any], secrets_dir: Path, secret_values: dict[str, str],
) -> None:
    from flower.command import is_flower_envvar

    argv = command_argv(compose, "flower")
    assert argv[:4] == ["celery", "-A", "workers", "flower"]
    assert "--port=5555" in argv
    assert [arg for arg in argv if arg.startswith("--conf=")] == [
        "--conf=/etc/vmtask/flowerconfig.py"]
    assert not any(arg.startswith(("--basic", "--auth")) for arg in argv), (
        "credentials on the command line show in the process list")
    environment = service_env(compose, "flower")
    # FLOWER_BASIC_AUTH would show in `docker inspect`; flowerconfig.py reads a file.
    assert "FLOWER_BASIC_AUTH" not in environment
    assert environment["FLOWER_BASIC_AUTH_FILE"] == f"{SECRETS_MOUNT}flower_basic_auth"
    assert not is_flower_envvar("FLOWER_BASIC_AUTH_FILE"), "Flower would take it as an option"
    assert set(compose["services"]["flower"]["secrets"]) == {
        "flower_basic_auth", "redis_worker_password"}
    # Flower loads the same app, as the same Redis user, as the workers.
    worker = service_env(compose, "worker-a")
    for name in ("VMTASK_REDIS_URL", "VMTASK_REDIS_PASSWORD_FILE"):
        assert environment[name] == worker[name]
    settings = Settings.from_env(sandboxed_env(compose, "flower", secrets_dir))
    assert urlsplit(settings.endpoint.url).password == secret_values["redis_worker_password"]
    published = [str(port).rsplit(":", 1)[1] for port in compose["services"]["flower"]["ports"]]
    assert published == ["5555"]


def test_no_literal_secret_in_the_compose_files(secret_values: dict[str, str]) -> None:
    secret_keys, urls = 0, 0
    for path in (COMPOSE, COMPOSE_KVM):
        text = path.read_text()
        for value in secret_values.values():
            assert value not in text, f"{path.name} contains a generated secret"
        for where, value in strings(load_yaml(path)):
            key = where.rsplit(".", 1)[-1]
            for name in references(value):
                assert not SECRET_NAME.search(name), (
                    f"{path.name}: {where} takes a secret from .env: ${{{name}}}")
            if not key.endswith("]") and SECRET_NAME.search(key):
                secret_keys += 1
                assert key.endswith("_FILE") and value.startswith(SECRETS_MOUNT), (
                    f"{path.name}: {where} is a secret but not a secret file: {value!r}")
            for url in re.findall(r"[a-z]+://\S+", value):
                urls += 1
                password = urlsplit(url).password
                assert password is None, f"{path.name}: {where} has a password in {url!r}"
        for service in load_yaml(path).get("services", {}).values():
            argv = service.get("command") or []
            for flag in ("--requirepass", "--basic-auth", "--basic_auth", "--password",
                         "--pass", "-a"):
                assert flag not in argv, f"{flag} in a command of {path.name}"
    # The checks above did look at something: the *_FILE variables and the URLs.
    assert secret_keys >= 3 and urls >= 3, (secret_keys, urls)


def test_kvm_is_an_opt_in_override(raw_compose: dict[str, Any], dotenv: dict[str, str]) -> None:
    assert "/dev/kvm" not in json.dumps(raw_compose), (
        "docker-compose.yml must start on hosts without /dev/kvm; KVM is in the override")
    _, commented = parse_env_file(ENV_EXAMPLE)
    override = resolve(load_yaml(COMPOSE_KVM), {**dotenv, **commented})
    assert set(override["services"]) == set(WORKERS)
    for service in WORKERS:
        settings = override["services"][service]
        assert settings["devices"] == ["/dev/kvm:/dev/kvm"]
        assert [str(gid) for gid in settings["group_add"]] == [commented["KVM_GID"]]
    assert "docker-compose.kvm.yml" in commented.get("COMPOSE_FILE", "")


@pytest.mark.skipif(shutil.which("docker-compose") is None,
                    reason="docker-compose (Debian's, v1) is not installed: scripts/bootstrap.sh")
def test_docker_compose_accepts_the_files(tmp_path: Path) -> None:
    """Compose's own schema check (`docker-compose config`; no engine is needed)."""
    files = ["-f", str(COMPOSE), "-f", str(COMPOSE_KVM)]
    env = {"PATH": "/usr/bin:/bin", "KVM_GID": "994", "HOME": str(tmp_path)}
    done = subprocess.run(["docker-compose", "--project-directory", str(REPO_ROOT), *files,
                           "config"], capture_output=True, text=True, env=env, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    config = load_yaml_text(done.stdout)
    # docker-compose v1 lists every profile's services; the default ones are these.
    assert {name for name, s in config["services"].items() if not s.get("profiles")} \
        == SERVICES
    for name, secret in config["secrets"].items():
        assert Path(secret["file"]) == REPO_ROOT / "secrets" / name
    assert config["services"]["worker-a"]["devices"] == ["/dev/kvm:/dev/kvm"]
    assert (REPO_ROOT / config["services"]["flower"]["build"]["context"]).resolve() \
        == DOCKERFILE.parent

