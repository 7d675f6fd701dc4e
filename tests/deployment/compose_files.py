"""Reading the deployment files as Docker would, for the tests of tests/deployment.

docker-compose.yml (and its KVM override), Dockerfile, .dockerignore and
.env.example are parsed here; Compose's ``${VAR}`` interpolation is applied with
the values of .env.example.  Paths under /run/secrets (where Compose mounts
secrets) are moved into a test's own directory by `in_sandbox`.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from workers.devtools.sandbox import REPO_ROOT, free_port, stop_process_group, wait_until

yaml = pytest.importorskip("yaml", reason="PyYAML parses docker-compose.yml (test extra)")

SECRETS_MOUNT = "/run/secrets/"
MAKE_SECRETS = REPO_ROOT / "scripts" / "make-secrets.sh"
COMPOSE = REPO_ROOT / "docker-compose.yml"
COMPOSE_KVM = REPO_ROOT / "docker-compose.kvm.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
VENV_BIN = Path(sys.executable).parent

WORKERS = {"worker-a": "host-a", "worker-b": "host-b"}
SERVICES = {"redis", "worker-a", "worker-b", "flower", "exporter"}
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
    return load_yaml_text(path.read_text(), path.name)


def load_yaml_text(text: str, name: str = "YAML") -> dict[str, Any]:
    document = yaml.safe_load(text)
    assert isinstance(document, dict), f"{name} is not a mapping"
    return document


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




# -- secrets: made by scripts/make-secrets.sh, mounted at /run/secrets ---------------


def in_sandbox(value: str, secrets_dir: Path) -> str:
    """``value`` with Compose's secret mount point moved to ``secrets_dir``."""
    return value.replace(SECRETS_MOUNT, f"{secrets_dir}/")


def make_secrets(directory: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Runs the script; as root it also chowns, as anyone else it is told not to."""
    chown = () if os.geteuid() == 0 else ("--no-chown",)
    return subprocess.run([str(MAKE_SECRETS), *chown, *extra, str(directory)],
                          capture_output=True, text=True, timeout=60, check=False)


# Files make-secrets.sh renders from templates, not passwords of their own.
RENDERED = {"redis_users_acl", "redis_ha_conf", "sentinel_conf"}


def read_secrets(directory: Path) -> dict[str, str]:
    """Every secret file's first line, by file name (the rendered files excepted)."""
    return {path.name: path.read_text().splitlines()[0] for path in directory.iterdir()
            if path.name not in RENDERED}


def image_source(image_path: str) -> Path:
    """The file of this repository that the Dockerfile copies to ``image_path``."""
    for keyword, arguments in dockerfile_instructions():
        words = [word for word in arguments.split() if not word.startswith("--")]
        if keyword == "COPY" and len(words) == 2 and words[1] == image_path:
            return REPO_ROOT / words[0]
    raise AssertionError(f"the Dockerfile copies nothing to {image_path}")


def process_texts(pid: int) -> str:
    """What `ps e` shows of a process group: every member's argv and environment."""
    members = subprocess.run(["pgrep", "-g", str(pid)], capture_output=True, text=True,
                             check=False).stdout.split()
    texts = []
    for member in members or [str(pid)]:
        for name in ("cmdline", "environ"):
            try:
                texts.append(Path(f"/proc/{member}/{name}").read_bytes()
                             .replace(b"\0", b" ").decode(errors="replace"))
            except OSError:  # it exited meanwhile
                pass
    assert texts, f"no process in group {pid}"
    return "\n".join(texts)


class ComposeRedis:
    """The compose redis command on a free port, its secrets read from ``secrets_dir``.

    Only what a container gives for free is added: a port, a loopback address, a
    data directory and a log file.
    """

    def __init__(self, compose: dict[str, Any], secrets_dir: Path, directory: Path) -> None:
        self.argv = [in_sandbox(arg, secrets_dir) for arg in command_argv(compose, "redis")]
        self.secrets_dir = secrets_dir
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def admin(self) -> redis.Redis:
        password = (self.secrets_dir / "redis_admin_password").read_text().strip()
        return redis.Redis(host="127.0.0.1", port=self.port, username="admin",
                           password=password, socket_timeout=5, decode_responses=True)

    def url(self, user: str) -> str:
        """A URL without a password: it comes from ``redis_<user>_password``."""
        return f"redis://{user}@127.0.0.1:{self.port}/0"

    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, wait: bool = True) -> ComposeRedis:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [*self.argv, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log")],
            start_new_session=True)
        if wait:
            def ready() -> bool:
                if self.proc is not None and self.proc.poll() is not None:
                    raise AssertionError(f"redis-server exited:\n{self.log()}")
                try:
                    return bool(self.admin().ping())
                except redis.ConnectionError:
                    return False

            wait_until(ready, 20, f"the compose redis-server on port {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)
            self.proc = None
