"""The one settings object, read from ``VMTASK_*`` variables by producers and workers."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from api.errors import InvalidArgumentError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
HOST_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
ACCELERATORS = ("auto", "kvm", "tcg")


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def validate_host_name(host: str) -> str:
    if not isinstance(host, str) or not HOST_NAME_PATTERN.match(host):
        raise InvalidArgumentError(
            f"Invalid host name {host!r}: use letters, digits, '.', '_' or '-' (at most 63)"
        )
    return host


def _number(env: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidArgumentError(f"{name} must be a number, not {raw!r}") from None
    if value < minimum:
        raise InvalidArgumentError(f"{name} must be at least {minimum}, not {raw!r}")
    return value


@dataclass(frozen=True)
class Settings:
    redis_url: str = DEFAULT_REDIS_URL
    host: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    storage_root: Path = Path("./var/storage")
    accel: str = "auto"
    # A running task's lease: a worker killed with -9 stops renewing it, and the task
    # is judged crashed once it expires. Renewed every third of its length.
    lease_seconds: float = 15.0
    # A host is live while its heartbeat key exists; it is refreshed every third.
    heartbeat_seconds: float = 10.0
    # How long a completed task's record is kept before Redis expires it.
    retention_seconds: float = 86400.0
    # Soft time limit of an operation that does not set its own.
    time_limit_seconds: float = 6 * 3600.0
    # Block devices or files a host-drive disk may refer to (exact paths or prefixes ending in /).
    host_drive_allow: tuple[str, ...] = ()
    # Bytes per second a VM save may write (0: unlimited), to spare a busy disk.
    save_max_bandwidth: int = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        accel = env.get("VMTASK_ACCEL", "auto") or "auto"
        if accel not in ACCELERATORS:
            raise InvalidArgumentError(f"VMTASK_ACCEL must be one of {ACCELERATORS}, not {accel!r}")
        defaults = cls()
        host = env.get("VMTASK_HOST") or defaults.host
        allow = tuple(p for p in env.get("VMTASK_HOST_DRIVE_ALLOW", "").split(os.pathsep) if p)
        return cls(
            redis_url=env.get("VMTASK_REDIS_URL") or DEFAULT_REDIS_URL,
            host=validate_host_name(host),
            storage_root=Path(env.get("VMTASK_STORAGE_ROOT") or defaults.storage_root).absolute(),
            accel=accel,
            lease_seconds=_number(env, "VMTASK_LEASE_SECONDS", defaults.lease_seconds, 1.0),
            heartbeat_seconds=_number(
                env, "VMTASK_HEARTBEAT_SECONDS", defaults.heartbeat_seconds, 1.0
            ),
            retention_seconds=_number(
                env, "VMTASK_RETENTION_SECONDS", defaults.retention_seconds, 1.0
            ),
            time_limit_seconds=_number(
                env, "VMTASK_TIME_LIMIT_SECONDS", defaults.time_limit_seconds, 1.0
            ),
            host_drive_allow=allow,
            save_max_bandwidth=int(_number(env, "VMTASK_SAVE_MAX_BANDWIDTH", 0, 0)),
        )
