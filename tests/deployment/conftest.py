"""Fixtures of the deployment tests: the compose files as Compose reads them, and secrets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.deployment.compose_files import (
    COMPOSE,
    ENV_EXAMPLE,
    PLACEHOLDER,
    load_yaml,
    make_secrets,
    parse_env_file,
    read_secrets,
    resolve,
)

# The real engine and stack of test_stack*.py (root only; started when asked for).
from tests.deployment.stack import engine, stack  # noqa: F401


@pytest.fixture(scope="module")
def dotenv() -> dict[str, str]:
    """.env.example as filled in (it should hold no placeholder any more)."""
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


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh ./secrets, made by scripts/make-secrets.sh."""
    directory = tmp_path_factory.mktemp("compose") / "secrets"
    made = make_secrets(directory)
    assert made.returncode == 0, made.stderr
    return directory


@pytest.fixture(scope="module")
def secret_values(secrets_dir: Path) -> dict[str, str]:
    return read_secrets(secrets_dir)
