"""Dockerfile and .dockerignore: what the image holds, runs, and never holds."""

from __future__ import annotations

import json
import re
import tomllib
from typing import Any

from tests.deployment.compose_files import (
    DOCKERIGNORE,
    SECRET_NAME,
    STORAGE_ROOT,
    WORKERS,
    command_argv,
    dockerfile_instructions,
    dockerignore_excludes,
    image_source,
)
from workers.devtools.sandbox import REPO_ROOT


def test_dockerfile_installs_qemu_and_the_project() -> None:
    instructions = dockerfile_instructions()
    # The base is a build argument whose default is the official image.
    assert instructions[0][0] == "ARG"
    name, _, default = instructions[0][1].partition("=")
    assert default.startswith("python:3.11-slim")
    assert instructions[1] == ("FROM", f"${{{name}}}")
    runs = [arguments for keyword, arguments in instructions if keyword == "RUN"]
    installs = [run for run in runs if "apt-get install" in run]
    assert installs, "no apt-get install"
    packages = set(" ".join(installs).split())
    assert {"qemu-utils", "qemu-system-x86", "--no-install-recommends"} <= packages
    assert any("rm -rf /var/lib/apt/lists" in run for run in installs)
    # The image installs the worker's, Flower's and the exporter's extras, not the test ones.
    assert any(re.search(r"""\bpip install --no-deps "\.\[worker,flower,exporter\]"(\s|$)""", run)
               for run in runs)
    # ... whose dependencies come from the lock file, by version and hash.
    assert any(re.search(r"\bpip install --require-hashes -r requirements\.lock(\s|$)", run)
               for run in runs)
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
                 "tests/conftest.py", "workers/__pycache__/app.cpython-311.pyc", "bench/x.py",
                 "secrets/redis_worker_password", "secrets/redis_users_acl",
                 "deploy/redis/users.acl.template"):
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


def test_the_flower_config_the_compose_command_names_is_in_the_image(
    compose: dict[str, Any],
) -> None:
    conf = [arg.split("=", 1)[1] for arg in command_argv(compose, "flower")
            if arg.startswith("--conf=")]
    assert len(conf) == 1 and conf[0].startswith("/etc/"), "outside Celery's sys.path"
    assert image_source(conf[0]) == REPO_ROOT / "deploy" / "flower" / "flowerconfig.py"


def test_the_lock_file_pins_every_dependency_of_the_image_with_hashes() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["worker"],
              *project["optional-dependencies"]["flower"]]
    names = {re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower().replace(".", "-")
             for requirement in wanted}
    lock = (REPO_ROOT / "deploy" / "requirements.lock").read_text()
    pins = dict(re.findall(r"(?m)^([A-Za-z0-9_.-]+)==(\S+) \\$", lock))
    assert names <= {name.lower().replace(".", "-").replace("_", "-") for name in pins}, \
        "a dependency of pyproject.toml is not in deploy/requirements.lock: run " \
        "scripts/lock-image-requirements.sh"
    # Every pinned package carries at least one hash (pip --require-hashes needs them).
    blocks = re.split(r"(?m)^(?=[A-Za-z0-9_.-]+==)", lock)[1:]
    assert len(blocks) == len(pins) and all("--hash=sha256:" in block for block in blocks)
