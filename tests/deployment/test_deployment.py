"""The deployment files, checked against the real code without Docker.

docker-compose.yml (and its KVM override), Dockerfile, .dockerignore and
.env.example are parsed here; Compose's ``${VAR}`` interpolation is applied with
the placeholders of .env.example.  What a container would run is then checked by
the code that will run it: `Settings.from_env` reads the workers' environment,
``from workers import app`` loads with it, and each worker's compose command is
run verbatim (against a private redis-server with the same password) until it
serves its host's queue, answers a ping task and passes its own healthcheck.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

from api import VirtualServer, VMTaskResult
from api.protocol import keys
from api.settings import ACCELERATORS, Settings
from workers.devtools.sandbox import REPO_ROOT, RedisServer, stop_process_group, wait_until

yaml = pytest.importorskip("yaml", reason="PyYAML parses docker-compose.yml (test extra)")

COMPOSE = REPO_ROOT / "docker-compose.yml"
COMPOSE_KVM = REPO_ROOT / "docker-compose.kvm.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
VENV_BIN = Path(sys.executable).parent

WORKERS = {"worker-a": "host-a", "worker-b": "host-b"}
SERVICES = {"redis", "worker-a", "worker-b", "flower"}
# Variables Compose itself reads from .env; documented there without being used.
COMPOSE_OWN_VARIABLES = {"COMPOSE_FILE", "COMPOSE_PROJECT_NAME", "COMPOSE_PROFILES"}
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|API_?KEY|AUTH", re.I)
PLACEHOLDER = "change-me"
STORAGE_ROOT = "/var/lib/vmtask"

# Compose interpolation: $$, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error},
# ${VAR?error}, ${VAR:+replacement}, ${VAR+replacement} and $VAR.
REFERENCE = re.compile(
    r"\$(?:(?P<escape>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^{}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


# -- helpers: .env, interpolation, Compose files, Dockerfile ----------------------


def parse_env_file(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(set, commented-out) ``KEY=value`` lines: both count as documented."""
    active: dict[str, str] = {}
    commented: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        target = active
        if line.startswith("#"):
            target, line = commented, line.lstrip("#").strip()
        match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", line)
        if match:
            target[match[1]] = match[2].strip()
        else:
            assert target is commented, f"{path.name}: not KEY=value: {line!r}"
    return active, commented


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's substitution; an unset variable without a default is an error here."""

    def substitute(match: re.Match[str]) -> str:
        if match["escape"]:
            return "$"
        name = match["braced"] or match["bare"]
        op, arg, value = match["op"], match["arg"], env.get(name)
        if op in (":-", "-"):
            return value if value or (op == "-" and value is not None) else arg
        if op in (":?", "?"):
            if value is None or (op == ":?" and not value):
                raise KeyError(f"{name} is required: {arg}")
            return value
        if op in (":+", "+"):
            return arg if value or (op == "+" and value is not None) else ""
        if value is None:
            raise KeyError(f"${{{name}}} has no value and no default")
        return value

    rest = REFERENCE.sub("", text)
    assert "$" not in rest, f"invalid interpolation in {text!r}"
    return REFERENCE.sub(substitute, text)


def references(text: str) -> list[str]:
    return [m["braced"] or m["bare"] for m in REFERENCE.finditer(text) if not m["escape"]]


def strings(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Every string value in a parsed YAML document, with a dotted path to it."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from strings(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from strings(value, f"{path}[{index}]")
    elif isinstance(node, str):
        yield path, node


def resolve(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, dict):
        return {key: resolve(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [resolve(value, env) for value in node]
    if isinstance(node, str):
        return interpolate(node, env)
    return node


def load_yaml(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text())
    assert isinstance(document, dict), f"{path.name} is not a mapping"
    return document


@pytest.fixture(scope="module")
def dotenv() -> dict[str, str]:
    """.env.example as filled in: vmtask refuses change-me values (test_compose_hardening)."""
    values = parse_env_file(ENV_EXAMPLE)[0]
    return {name: f"filled-in-{name.lower()}" if PLACEHOLDER in value else value
            for name, value in values.items()}


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def compose(raw_compose: dict[str, Any], dotenv: dict[str, str]) -> dict[str, Any]:
    """docker-compose.yml as Compose sees it with .env = .env.example."""
    resolved: dict[str, Any] = resolve(raw_compose, dotenv)
    return resolved


def service_env(compose: dict[str, Any], service: str) -> dict[str, str]:
    environment = compose["services"][service].get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {str(key): str(value) for key, value in environment.items()}


def command_argv(compose: dict[str, Any], service: str) -> list[str]:
    command = compose["services"][service]["command"]
    return list(command) if isinstance(command, list) else shlex.split(command)


def healthcheck_shell(compose: dict[str, Any], service: str) -> str:
    test = compose["services"][service]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL", test
    return str(test[1])


def isolated_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without any VMTASK_* of the developer's, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VMTASK_", "FLOWER_"))}
    env.update(extra)
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def with_address(url: str, host: str, port: int) -> str:
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{auth}@{host}:{port}" if auth else f"{host}:{port}"))


class RecordingEnv(dict[str, str]):
    """An environment that remembers which variables were looked up."""

    def __init__(self, values: Mapping[str, str]) -> None:
        super().__init__(values)
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.read.add(key)
        return super().__contains__(key)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), " ".join(arguments.split())))
        pending = ""
    assert not pending, "Dockerfile ends inside a continuation"
    return instructions


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""

    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        for token in re.split(r"(\*\*/?|\*|\?)", pattern):
            if token.startswith("**"):
                out += "(?:.*/)?" if token.endswith("/") else ".*"
            elif token == "*":
                out += "[^/]*"
            elif token == "?":
                out += "[^/]"
            else:
                out += re.escape(token)
        return re.compile(out)

    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        compiled = regex(pattern.lstrip("!").strip("/"))
        if any(compiled.fullmatch(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def secret_looking(line: str) -> bool:
    """A long token mixing letters and digits (random key material), or a long hex run."""
    if re.search(r"(?<![0-9A-Za-z])[0-9a-fA-F]{16,}(?![0-9A-Za-z])", line):
        return True
    for token in re.findall(r"[A-Za-z0-9+/_.~-]{16,}", line):
        if PLACEHOLDER in token:
            continue
        if re.search(r"[A-Za-z]", token) and re.search(r"[0-9]", token):
            return True
    return False


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


def test_env_example_holds_placeholders_not_secrets() -> None:
    active, commented = parse_env_file(ENV_EXAMPLE)
    values = {**commented, **active}
    secrets = {name: value for name, value in values.items() if SECRET_NAME.search(name)}
    assert {"REDIS_PASSWORD", "FLOWER_PASSWORD"} <= set(secrets)
    for name, value in secrets.items():
        assert PLACEHOLDER in value, f"{name}={value!r} is not an obvious placeholder"
        # They go into redis:// URLs and FLOWER_BASIC_AUTH as they are.
        assert quote(value, safe="-_.~") == value, f"{name} is not URL-safe"
        assert "," not in value
    # Nothing else that looks like key material, anywhere (comments included).
    assert not [line for line in ENV_EXAMPLE.read_text().splitlines() if secret_looking(line)]
    # ... and that detector does flag real-looking values.
    assert secret_looking("REDIS_PASSWORD=9f86d081884c7d659a2feaa0c55ad015")
    assert secret_looking("# FLOWER_PASSWORD=Vq3xL9pT2mZk8RwB4nHy")
    assert not secret_looking(f"REDIS_PASSWORD={PLACEHOLDER}-redis-password")


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


def test_redis_keeps_an_append_only_file_and_requires_a_password(
    raw_compose: dict[str, Any], compose: dict[str, Any], dotenv: dict[str, str]
) -> None:
    raw, redis_service = raw_compose["services"]["redis"], compose["services"]["redis"]
    # A pinned release (major.minor.patch), never a floating tag such as redis:7.
    assert re.fullmatch(r"redis:7\.\d+\.\d+(-[a-z0-9]+)?", redis_service["image"])
    argv = command_argv(compose, "redis")
    assert argv[0] == "redis-server"
    assert argv[argv.index("--appendonly") + 1] == "yes"
    assert argv[argv.index("--requirepass") + 1] == dotenv["REDIS_PASSWORD"]
    raw_argv = command_argv(raw_compose, "redis")
    assert references(raw_argv[raw_argv.index("--requirepass") + 1]) == ["REDIS_PASSWORD"]
    volume, _, target = redis_service["volumes"][0].partition(":")
    assert target == "/data" and volume in compose["volumes"], "AOF must live in a volume"
    assert "-a " not in str(raw["healthcheck"]), "the healthcheck must not put it in argv"


def test_redis_healthcheck_authenticates_without_the_password_in_argv(
    compose: dict[str, Any], dotenv: dict[str, str], tmp_path: Path
) -> None:
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not installed")
    password = dotenv["REDIS_PASSWORD"]
    server = RedisServer(tmp_path / "redis", password=password).start()
    try:
        check = healthcheck_shell(compose, "redis")
        # Inside the container redis-cli's default address is the container's own Redis;
        # here it must be ours, never the machine's Redis on 6379.
        assert check.count("redis-cli ") == 1
        check = check.replace("redis-cli ", f"redis-cli -p {server.port} ")
        env = service_env(compose, "redis")
        ok = subprocess.run(["sh", "-c", check], env=isolated_env(env), timeout=20, check=False)
        assert ok.returncode == 0
        wrong = {**env, "REDISCLI_AUTH": "wrong-password"}
        bad = subprocess.run(["sh", "-c", check], env=isolated_env(wrong), timeout=20,
                             capture_output=True, check=False)
        assert bad.returncode != 0, "the healthcheck passes without the right password"
    finally:
        server.stop()


@pytest.mark.parametrize(("service", "host"), sorted(WORKERS.items()))
def test_worker_environment_is_what_settings_reads(
    compose: dict[str, Any], dotenv: dict[str, str], service: str, host: str
) -> None:
    environment = service_env(compose, service)
    recording = RecordingEnv(environment)
    settings = Settings.from_env(recording)
    vmtask_vars = {name for name in environment if name.startswith("VMTASK_")}
    assert vmtask_vars == {"VMTASK_REDIS_URL", "VMTASK_HOST", "VMTASK_STORAGE_ROOT",
                           "VMTASK_ACCEL"}
    assert vmtask_vars <= recording.read, (
        f"set in compose but never read by Settings.from_env: {vmtask_vars - recording.read}")
    assert settings.host == host
    assert settings.storage_root == Path(STORAGE_ROOT)
    assert settings.accel == "auto" and settings.accel in ACCELERATORS
    url = urlsplit(settings.redis_url)
    assert (url.scheme, url.hostname, url.port, url.path) == ("redis", "redis", 6379, "/0")
    assert url.password == dotenv["REDIS_PASSWORD"]
    # The storage root is this host's own named volume.
    mounts = {target: source for source, target, *_ in
              (item.split(":") for item in compose["services"][service]["volumes"])}
    assert mounts[STORAGE_ROOT] in compose["volumes"]


def test_each_host_has_its_own_storage_volume(compose: dict[str, Any]) -> None:
    volumes = [compose["services"][service]["volumes"] for service in WORKERS]
    sources = [next(v.split(":")[0] for v in vs if v.endswith(":" + STORAGE_ROOT))
               for vs in volumes]
    assert len(set(sources)) == len(WORKERS), sources


def test_flower_uses_basic_auth_from_the_environment(
    raw_compose: dict[str, Any], compose: dict[str, Any], dotenv: dict[str, str]
) -> None:
    from flower.command import is_flower_envvar

    argv = command_argv(compose, "flower")
    assert argv[:4] == ["celery", "-A", "workers", "flower"]
    assert "--port=5555" in argv
    assert not any(arg.startswith("--basic") or arg.startswith("--basic_auth") for arg in argv), (
        "credentials on the command line show in the process list; use FLOWER_BASIC_AUTH")
    # Flower 2.x maps FLOWER_<OPTION> variables onto its options.
    assert is_flower_envvar("FLOWER_BASIC_AUTH")
    environment = service_env(compose, "flower")
    assert environment["FLOWER_BASIC_AUTH"] == (
        f"{dotenv['FLOWER_USER']}:{dotenv['FLOWER_PASSWORD']}")
    raw = service_env(raw_compose, "flower")["FLOWER_BASIC_AUTH"]
    assert references(raw) == ["FLOWER_USER", "FLOWER_PASSWORD"]
    assert environment["VMTASK_REDIS_URL"] == service_env(compose, "worker-a")["VMTASK_REDIS_URL"]
    Settings.from_env(environment)  # Flower loads the same app: its settings must be valid
    published = [str(port).rsplit(":", 1)[1] for port in compose["services"]["flower"]["ports"]]
    assert published == ["5555"]


def test_no_literal_secret_in_the_compose_files(dotenv: dict[str, str]) -> None:
    placeholders = [value for name, value in dotenv.items() if SECRET_NAME.search(name)]
    secret_keys, urls = 0, 0
    for path in (COMPOSE, COMPOSE_KVM):
        text = path.read_text()
        for value in placeholders:
            assert value not in text, f"{path.name} contains .env's {value!r}"
        for where, value in strings(load_yaml(path)):
            key = where.rsplit(".", 1)[-1]
            if SECRET_NAME.search(key):
                secret_keys += 1
                leftover = REFERENCE.sub("", value)
                assert references(value) and not leftover.strip(":,"), (
                    f"{path.name}: {where} is not made of ${{VARIABLES}}: {value!r}")
            for url in re.findall(r"[a-z]+://\S+", value):
                urls += 1
                password = urlsplit(url).password
                assert password is None or REFERENCE.fullmatch(password), (
                    f"{path.name}: {where} has a literal password in {url!r}")
        for service in load_yaml(path).get("services", {}).values():
            argv = service.get("command") or []
            for flag in ("--requirepass", "--basic-auth", "--basic_auth", "--password"):
                if isinstance(argv, list) and flag in argv:
                    assert references(argv[argv.index(flag) + 1]), f"{flag} literal in {path}"
    # The checks above did look at something: FLOWER_BASIC_AUTH, REDISCLI_AUTH, the URLs.
    assert secret_keys >= 2 and urls >= 3, (secret_keys, urls)


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


@pytest.mark.parametrize(("service", "host"), sorted(WORKERS.items()))
def test_worker_command_loads_the_workers_app_for_its_host(
    compose: dict[str, Any], service: str, host: str
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
    environment = service_env(compose, service)
    done = subprocess.run([sys.executable, "-c", probe], env=isolated_env(environment),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    # Long operations, and quick ones (also served by the host's control lane).
    assert loaded["queues"] == [keys.host_queue(host), keys.control_queue(host)] \
        == [f"host.{host}", f"host.{host}.control"]
    assert loaded["default"] == f"host.{host}"
    assert (loaded["host"], loaded["root"]) == (host, STORAGE_ROOT)
    assert loaded["broker"] == environment["VMTASK_REDIS_URL"]
    assert loaded["events"] is True, "Flower needs task events"
    assert loaded["accept"] == ["json"]


@pytest.mark.parametrize(("service", "host"), sorted(WORKERS.items()))
def test_worker_command_runs_and_serves_its_host(
    compose: dict[str, Any], dotenv: dict[str, str], tmp_path: Path, service: str, host: str
) -> None:
    """The compose command, verbatim, with only Redis's address and the storage root moved."""
    password = dotenv["REDIS_PASSWORD"]
    redis_server = RedisServer(tmp_path / "redis", password=password).start()
    environment = service_env(compose, service)
    url = with_address(environment["VMTASK_REDIS_URL"], "127.0.0.1", redis_server.port)
    environment.update(VMTASK_REDIS_URL=url, VMTASK_STORAGE_ROOT=str(tmp_path / "storage"),
                       HOSTNAME=socket.gethostname())  # Docker sets HOSTNAME; %h is it
    argv = command_argv(compose, service)
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(VENV_BIN / argv[0]), *argv[1:]], cwd=tmp_path, env=isolated_env(environment),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        client = redis_server.client()

        def serving() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"worker exited:\n{log_path.read_text(errors='replace')}")
            beat = client.get(keys.host_heartbeat(host))
            return beat is not None and json.loads(beat).get("pid") == proc.pid

        wait_until(serving, 60, f"the {service} command to serve {host}", interval=0.1)
        with VirtualServer(url, host=host, poll_interval=0.5) as server:
            task = server.ping(duration_ms=50, steps=1)
            assert task.wait_for_completion(20_000) is True
            assert task.result is VMTaskResult.Success
        health = subprocess.run(["sh", "-c", healthcheck_shell(compose, service)],
                                env=isolated_env(environment), cwd=tmp_path,
                                capture_output=True, text=True, timeout=60, check=False)
        assert health.returncode == 0, health.stdout + health.stderr
    finally:
        stop_process_group(proc)
        redis_server.stop()
    assert password not in log_path.read_text(errors="replace"), "the worker logged the password"


# -- Dockerfile and .dockerignore -----------------------------------------------------


def test_dockerfile_installs_qemu_and_the_project() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0][0] == "FROM"
    assert instructions[0][1].split()[0].startswith("python:3.11-slim")
    runs = [arguments for keyword, arguments in instructions if keyword == "RUN"]
    installs = [run for run in runs if "apt-get install" in run]
    assert installs, "no apt-get install"
    packages = set(" ".join(installs).split())
    assert {"qemu-utils", "qemu-system-x86", "--no-install-recommends"} <= packages
    assert any("rm -rf /var/lib/apt/lists" in run for run in installs)
    # The worker image installs the worker's and Flower's extras, not the test ones.
    assert any(re.search(r"""\bpip install "\.\[worker,flower\]"(\s|$)""", run) for run in runs)
    # Everything `pip install .` needs is copied: pyproject's packages and its readme.
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    copied = {source.strip("/") for keyword, arguments in instructions if keyword == "COPY"
              for source in arguments.split()[:-1] if not source.startswith("--")}
    needed = {"pyproject.toml", project["project"]["readme"],
              *(pattern.rstrip("*") for pattern
                in project["tool"]["setuptools"]["packages"]["find"]["include"])}
    assert needed <= copied, f"not copied into the image: {needed - copied}"


def test_dockerfile_runs_the_workers_app_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    users = [arguments for keyword, arguments in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    user = users[-1].split(":")[0]
    assert any("useradd" in run and user in run.split()
               for keyword, run in instructions if keyword == "RUN")
    assert not [i for i in instructions if i[0] == "ENTRYPOINT"]
    cmd = [arguments for keyword, arguments in instructions if keyword == "CMD"]
    assert len(cmd) == 1
    assert json.loads(cmd[0]) == ["celery", "-A", "workers", "worker", "--loglevel", "INFO"]
    for keyword, arguments in instructions:
        if keyword in ("ENV", "ARG"):
            name = arguments.split("=")[0].split()[0]
            assert not SECRET_NAME.search(name), f"secret baked into the image: {keyword} {name}"
    env = dict(a.split("=", 1) for k, a in instructions if k == "ENV" and "=" in a and " " not in a)
    assert env.get("VMTASK_STORAGE_ROOT", STORAGE_ROOT) == STORAGE_ROOT


def test_the_compose_commands_extend_the_image_command(compose: dict[str, Any]) -> None:
    cmd = json.loads(next(a for k, a in dockerfile_instructions() if k == "CMD"))
    for service in WORKERS:
        assert command_argv(compose, service)[: len(cmd)] == cmd


def test_dockerignore_sends_the_packages_and_never_the_secrets() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    for path in (".env", ".env.example", ".git/config", ".venv/bin/python", "var/storage/a.vhd",
                 "tests/conftest.py", "workers/__pycache__/app.cpython-311.pyc", "bench/x.py"):
        assert dockerignore_excludes(patterns, path), f"{path} would be in the build context"
    copied = [arguments.split()[:-1] for keyword, arguments in dockerfile_instructions()
              if keyword == "COPY"]
    for source in (s.strip("/") for sources in copied for s in sources):
        root = REPO_ROOT / source
        files = [root] if root.is_file() else [
            p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        assert files, f"COPY {source}: nothing there"
        for file in files:
            relative = file.relative_to(REPO_ROOT).as_posix()
            assert not dockerignore_excludes(patterns, relative), f"{relative} is ignored"
