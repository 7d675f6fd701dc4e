"""The one settings object, read from ``VMTASK_*`` variables by producers and workers."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from api.connection import RedisEndpoint, parse_redis_url, read_secret_file, redact_url
from api.enums import ACCELERATORS
from api.errors import InvalidArgumentError

__all__ = ["ACCELERATORS", "DEFAULT_REDIS_URL", "Settings", "redact_url", "validate_host_name"]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
HOST_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
WORKER_ROLES = ("main", "control")


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


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise InvalidArgumentError(f"{name} must be 1 or 0, not {raw!r}")


_ADDRESS_RE = re.compile(r"^[A-Za-z0-9.:-]{1,64}$")


def _address(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name) or default
    if not _ADDRESS_RE.match(raw):
        raise InvalidArgumentError(f"{name} must be a host address, not {raw!r}")
    return raw


def _port_range(env: Mapping[str, str], name: str, default: tuple[int, int]) -> tuple[int, int]:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    match = re.fullmatch(r"(\d{1,5})-(\d{1,5})", raw.strip())
    low, high = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    if not match or not 1024 <= low <= high <= 65535:
        raise InvalidArgumentError(f"{name} must be a port range LOW-HIGH within "
                                   f"1024-65535, not {raw!r}")
    return low, high


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
    # Bytes per second a live migration may send, for each disk's mirror and for RAM
    # (0: unlimited), to spare a shared link.
    migrate_max_bandwidth: int = 0
    # Long operations (copies, VM starts, saves) a host runs at once.  They wait on
    # subprocesses and QMP, not on the CPU, so this is not tied to the CPU count.
    concurrency: int = 4
    # Quick control operations (pause, turn off, disk info...) a host runs at once,
    # in their own lane that never waits behind long work.
    control_concurrency: int = 4
    # A message a worker took but never started (it died, or Redis restarted) goes
    # back to its queue after this long.  Safe to keep short: a copy of a task that
    # did start is dropped by the record's start gate.
    visibility_timeout_seconds: float = 30.0
    # Every Redis call's deadline: a frozen Redis fails calls after this long.
    redis_timeout_seconds: float = 5.0
    # Producers send a task-sent event per task, so Flower lists queued tasks.
    sent_events: bool = True
    # "main" serves the host; "control" is the lane for quick operations that the
    # main worker starts by itself.
    role: str = "main"
    # The address VM consoles (VNC, a free port per VM) listen on.
    vnc_listen: str = "127.0.0.1"
    # The address a VM's port forwards (network="user") listen on.
    forward_listen: str = "127.0.0.1"
    # The address other hosts reach this host's transfers on (NBD exports of disks
    # being copied or migrated): servers bind to it, and the heartbeat advertises it.
    advertise_address: str = "127.0.0.1"
    # The TCP ports transfers listen on (one per transfer while it runs), inclusive.
    transfer_ports: tuple[int, int] = (49152, 49407)
    # A transfer that receives nothing for this long ends TimeOutError: a partition
    # between hosts stalls a TCP stream for many minutes without failing it.
    transfer_stall_seconds: float = 60.0
    # A directory of certificates as QEMU's tls-creds-x509 reads it (ca-cert.pem,
    # server-cert.pem, server-key.pem, client-cert.pem, client-key.pem): every
    # transfer (copies, cold and live moves) is then TLS with both ends verified,
    # and one with a host of other credentials, or none, is refused.
    transfer_tls_dir: str | None = None
    # Or a directory holding QEMU's ``keys.psk`` (lines ``qemu:<hex key>``), the same
    # on every host: every transfer is then TLS with that pre-shared key.  At most
    # one of the two; neither: plain TCP.
    transfer_psk_dir: str | None = None
    # A VM's serial console log is rotated past this size (one old generation kept).
    console_log_max_bytes: int = 1024 * 1024
    # TLS files for a rediss:// URL (a CA to verify the server; a client certificate
    # and key when Redis asks for one), and a file holding the Redis password, so
    # that it stays out of the environment that `docker inspect` and `ps e` show.
    redis_ca: str | None = None
    redis_cert: str | None = None
    redis_key: str | None = None
    redis_password_file: str | None = None
    # With a sentinel:// URL: the primary's master name (unless the URL says
    # ?master_name=), how many replicas must acknowledge a write that counts (a
    # submitted task, a started or finished record; default 1 with Sentinel, 0
    # otherwise) and how long to wait for them.
    redis_sentinel_master: str | None = None
    redis_wait_replicas: int | None = None
    redis_wait_ms: int = 1000
    # How long producers and workers keep retrying Redis calls through a failover
    # before they give up (BrokerUnavailableError): Sentinel URLs only.
    redis_failover_seconds: float = 15.0

    def endpoint_for(self, url: str | None = None) -> RedisEndpoint:
        """``url`` (else ``VMTASK_REDIS_URL``) with these TLS files and password file."""
        password = (read_secret_file("VMTASK_REDIS_PASSWORD_FILE", self.redis_password_file)
                    if self.redis_password_file else None)
        return parse_redis_url(self.redis_url if url is None else url, ca=self.redis_ca,
                               cert=self.redis_cert, key=self.redis_key, password=password,
                               master=self.redis_sentinel_master,
                               wait_replicas=self.redis_wait_replicas,
                               wait_ms=self.redis_wait_ms,
                               failover_seconds=self.redis_failover_seconds)

    @cached_property
    def endpoint(self) -> RedisEndpoint:
        """The validated Redis URL and TLS options every client of this process uses."""
        return self.endpoint_for()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        accel = env.get("VMTASK_ACCEL", "auto") or "auto"
        if accel not in ACCELERATORS:
            raise InvalidArgumentError(f"VMTASK_ACCEL must be one of {ACCELERATORS}, not {accel!r}")
        defaults = cls()
        host = env.get("VMTASK_HOST") or defaults.host
        role = env.get("VMTASK_WORKER_ROLE") or "main"
        if role not in WORKER_ROLES:
            raise InvalidArgumentError(f"VMTASK_WORKER_ROLE must be one of {WORKER_ROLES}")
        def optional(name: str) -> str | None:
            return env.get(name) or None

        allow = tuple(p for p in env.get("VMTASK_HOST_DRIVE_ALLOW", "").split(os.pathsep) if p)
        settings = cls(
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
            migrate_max_bandwidth=int(_number(env, "VMTASK_MIGRATE_MAX_BANDWIDTH", 0, 0)),
            concurrency=int(_number(env, "VMTASK_CONCURRENCY", defaults.concurrency, 1)),
            control_concurrency=int(_number(env, "VMTASK_CONTROL_CONCURRENCY",
                                            defaults.control_concurrency, 1)),
            visibility_timeout_seconds=_number(env, "VMTASK_VISIBILITY_TIMEOUT_SECONDS",
                                               defaults.visibility_timeout_seconds, 5.0),
            redis_timeout_seconds=_number(env, "VMTASK_REDIS_TIMEOUT_SECONDS",
                                          defaults.redis_timeout_seconds, 0.5),
            role=role,
            sent_events=_flag(env, "VMTASK_SENT_EVENTS", defaults.sent_events),
            vnc_listen=_address(env, "VMTASK_VNC_LISTEN", defaults.vnc_listen),
            forward_listen=_address(env, "VMTASK_FORWARD_LISTEN", defaults.forward_listen),
            advertise_address=_address(env, "VMTASK_ADVERTISE_ADDRESS",
                                       defaults.advertise_address),
            transfer_ports=_port_range(env, "VMTASK_TRANSFER_PORTS", defaults.transfer_ports),
            transfer_stall_seconds=_number(env, "VMTASK_TRANSFER_STALL_SECONDS",
                                           defaults.transfer_stall_seconds, 1.0),
            transfer_tls_dir=optional("VMTASK_TRANSFER_TLS_DIR"),
            transfer_psk_dir=optional("VMTASK_TRANSFER_PSK_DIR"),
            console_log_max_bytes=int(_number(env, "VMTASK_CONSOLE_LOG_MAX_BYTES",
                                              defaults.console_log_max_bytes, 4096)),
            redis_ca=optional("VMTASK_REDIS_CA"),
            redis_cert=optional("VMTASK_REDIS_CERT"),
            redis_key=optional("VMTASK_REDIS_KEY"),
            redis_password_file=optional("VMTASK_REDIS_PASSWORD_FILE"),
            redis_sentinel_master=optional("VMTASK_REDIS_SENTINEL_MASTER"),
            redis_wait_replicas=(int(_number(env, "VMTASK_REDIS_WAIT_REPLICAS", 0, 0))
                                 if env.get("VMTASK_REDIS_WAIT_REPLICAS") else None),
            redis_wait_ms=int(_number(env, "VMTASK_REDIS_WAIT_MS", defaults.redis_wait_ms, 1)),
            redis_failover_seconds=_number(env, "VMTASK_REDIS_FAILOVER_SECONDS",
                                           defaults.redis_failover_seconds, 0),
        )
        if settings.transfer_tls_dir and settings.transfer_psk_dir:
            raise InvalidArgumentError(
                "Set VMTASK_TRANSFER_TLS_DIR (x509 certificates) or VMTASK_TRANSFER_PSK_DIR "
                "(a pre-shared key) for transfer TLS, not both")
        settings.endpoint  # noqa: B018 - a bad URL or TLS file fails at start-up, not later
        return settings
