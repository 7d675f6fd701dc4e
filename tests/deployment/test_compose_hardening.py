"""Hardening of the compose deployment: capabilities, privileges, memory, placeholders."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from api.errors import InvalidArgumentError
from api.settings import Settings
from tests.deployment.compose_files import PLACEHOLDER, in_sandbox, service_env


def test_the_placeholders_are_refused_at_start_up(
    compose: dict[str, Any], tmp_path: Path,
) -> None:
    """A hand-made secret file still holding a placeholder stops the worker's settings."""
    (tmp_path / "redis_worker_password").write_text(f"{PLACEHOLDER}-redis-password\n")
    environment = {name: in_sandbox(value, tmp_path)
                   for name, value in service_env(compose, "worker-a").items()}
    with pytest.raises(InvalidArgumentError, match="placeholder"):
        Settings.from_env(environment)
    # The same in a URL, for producers that still put the password there.
    with pytest.raises(InvalidArgumentError, match="placeholder"):
        Settings.from_env({"VMTASK_REDIS_URL": f"redis://:{PLACEHOLDER}-x@redis:6379/0"})


def test_every_service_drops_capabilities_and_has_a_memory_limit(
    compose: dict[str, Any],
) -> None:
    for name, service in compose["services"].items():
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert re.fullmatch(r"\d+[mg]", str(service["mem_limit"])), name
        assert "privileged" not in service, name
    # Nothing adds a capability back.  Redis runs as its image's redis user, so
    # the entrypoint neither chowns /data nor needs gosu: started as root with
    # cap_drop ALL it could not enter appendonlydir and never started again.
    assert all("cap_add" not in service for service in compose["services"].values())
    assert compose["services"]["redis"]["user"] == "999:999"
