"""Hardening of the compose deployment: capabilities, privileges, memory, placeholders.

Uses the fixtures of test_deployment (docker-compose.yml resolved with .env.example).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from api.errors import InvalidArgumentError
from api.settings import Settings
from tests.deployment.test_deployment import (  # noqa: F401 - fixtures
    ENV_EXAMPLE,
    PLACEHOLDER,
    WORKERS,
    compose,
    dotenv,
    parse_env_file,
    raw_compose,
)


def test_the_placeholders_are_refused_at_start_up() -> None:
    placeholder = parse_env_file(ENV_EXAMPLE)[0]["REDIS_PASSWORD"]
    assert PLACEHOLDER in placeholder
    with pytest.raises(InvalidArgumentError, match="placeholder"):
        Settings.from_env({"VMTASK_REDIS_URL": f"redis://:{placeholder}@redis:6379/0"})


def test_every_service_drops_capabilities_and_has_a_memory_limit(
    compose: dict[str, Any],  # noqa: F811 - the fixture
) -> None:
    for name, service in compose["services"].items():
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert re.fullmatch(r"\d+[mg]", str(service["mem_limit"])), name
        assert "privileged" not in service, name
    # Workers and Flower add nothing back; Redis only what its entrypoint's gosu needs.
    assert compose["services"]["redis"]["cap_add"] == ["CHOWN", "SETUID", "SETGID"]
    assert all("cap_add" not in compose["services"][name] for name in (*WORKERS, "flower"))
