"""The one settings object, read from ``VMTASK_*`` variables by producers and workers.

Each variable is written once, as a `Settings` field made by `setting`: its
metadata holds the variable's name, how its text is read and its doc (vdsm's
table of config parameters is the model).  From that one table, `Settings.from_env`
reads the environment, `configuration_page` renders docs/operations/configuration.md
(a unit test fails when the committed page is stale), `effective` is what ``vmtask
config`` prints with secrets redacted, and `unknown_variables` is what a worker warns
about at start.  A new setting is one field here; then regenerate the page (`REGENERATE`).
"""

from __future__ import annotations

import difflib
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

from api.connection import RedisEndpoint, parse_redis_url, read_secret_file, redact_url
from api.enums import ACCELERATORS
from api.errors import InvalidArgumentError

__all__ = ["ACCELERATORS", "DEFAULT_REDIS_URL", "Settings", "configuration_page", "effective",
           "redact_url", "unknown_variables", "validate_host_name"]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
HOST_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
WORKER_ROLES = ("main", "control")


def validate_host_name(host: str) -> str:
    if not isinstance(host, str) or not HOST_NAME_PATTERN.match(host):
        raise InvalidArgumentError(
            f"Invalid host name {host!r}: use letters, digits, '.', '_' or '-' (at most 63)"
        )
    return host


Reader = Callable[[Mapping[str, str], str, Any], Any]


def setting(default: Any = MISSING, *, env: str, read: Reader, doc: str,
            shown: str | None = None, factory: Callable[[], Any] | None = None,
            redact: Callable[[str], str] | None = None) -> Any:
    """A `Settings` field with what is said about it once: its variable, how its
    text is read (``read(env, name, default)``), its documentation, where the
    default is no plain value how the configuration page shows it, and how to hide
    the secrets its value may hold (``vmtask config``)."""
    metadata = {"env": env, "read": read, "doc": doc, "shown": shown, "redact": redact}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def redact_secrets(url: str) -> str:
    """What ``vmtask config`` shows of a URL: `redact_url`'s view, as every log has."""
    return redact_url(url)


def _text(env: Mapping[str, str], name: str, default: Any) -> Any:
    return env.get(name) or default


def _host_name(env: Mapping[str, str], name: str, default: str) -> str:
    return validate_host_name(env.get(name) or default)


def _directory(env: Mapping[str, str], name: str, default: Path) -> Path:
    return Path(env.get(name) or default).absolute()


def _paths(env: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(p for p in (env.get(name) or "").split(os.pathsep) if p) or default


def _choice(choices: tuple[str, ...]) -> Reader:
    def read(env: Mapping[str, str], name: str, default: str) -> str:
        value = env.get(name) or default
        if value not in choices:
            raise InvalidArgumentError(f"{name} must be one of {choices}, not {value!r}")
        return value
    return read


def _parse_number(env: Mapping[str, str], name: str, minimum: float) -> float | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidArgumentError(f"{name} must be a number, not {raw!r}") from None
    if value < minimum:
        raise InvalidArgumentError(f"{name} must be at least {minimum}, not {raw!r}")
    return value


def _number(minimum: float) -> Reader:
    def read(env: Mapping[str, str], name: str, default: float) -> float:
        value = _parse_number(env, name, minimum)
        return default if value is None else value
    return read


def _integer(minimum: float) -> Reader:
    def read(env: Mapping[str, str], name: str, default: int | None) -> int | None:
        value = _parse_number(env, name, minimum)
        return default if value is None else int(value)
    return read


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
    """Every ``VMTASK_*`` setting: one field each, with its variable and its doc.

    `from_env` reads the variables through the fields' metadata, and
    ``vmtask config --markdown`` renders docs/operations/configuration.md from it.
    """

    redis_url: str = setting(
        DEFAULT_REDIS_URL, env="VMTASK_REDIS_URL", read=_text, redact=redact_secrets,
        doc="broker and result store (`redis://`, `rediss://`, `sentinel://`; "
            "password allowed)")
    host: str = setting(
        env="VMTASK_HOST", read=_host_name,
        factory=lambda: socket.gethostname().split(".")[0],
        doc="host this worker serves / producer's default target",
        shown="short hostname (worker); the only live host (producer)")
    storage_root: Path = setting(  # noqa: RUF009 - a Path is immutable
        Path("./var/storage"), env="VMTASK_STORAGE_ROOT", read=_directory,
        doc="root of this host's disks, VM state and sockets", shown="`./var/storage`")
    accel: str = setting(
        "auto", env="VMTASK_ACCEL", read=_choice(ACCELERATORS),
        doc="QEMU accelerator: `auto`, `kvm`, `tcg`")
    # A running task's lease: a worker killed with -9 stops renewing it, and the task
    # is judged crashed once it expires. Renewed every third of its length.
    lease_seconds: float = setting(
        15.0, env="VMTASK_LEASE_SECONDS", read=_number(1.0),
        doc="running-task lease; a dead worker's task ends ThreadCrash after it")
    # A host is live while its heartbeat key exists; it is refreshed every third.
    heartbeat_seconds: float = setting(
        10.0, env="VMTASK_HEARTBEAT_SECONDS", read=_number(1.0),
        doc="host heartbeat lifetime (refreshed every third)")
    retention_seconds: float = setting(
        86400.0, env="VMTASK_RETENTION_SECONDS", read=_number(1.0),
        doc="how long completed task records are kept")
    time_limit_seconds: float = setting(
        6 * 3600.0, env="VMTASK_TIME_LIMIT_SECONDS", read=_number(1.0),
        doc="default soft time limit of an operation (TimeOutError)")
    host_drive_allow: tuple[str, ...] = setting(
        (), env="VMTASK_HOST_DRIVE_ALLOW", read=_paths,
        doc="host devices/files a host-drive disk may use (`:`-separated; a prefix "
            "ends in `/`)")
    # To spare a busy disk.
    save_max_bandwidth: int = setting(
        0, env="VMTASK_SAVE_MAX_BANDWIDTH", read=_integer(0),
        doc="bytes/s a VM save may write; 0 is unlimited")
    # To spare a shared link.
    migrate_max_bandwidth: int = setting(
        0, env="VMTASK_MIGRATE_MAX_BANDWIDTH", read=_integer(0),
        doc="bytes/s a live migration may send, per disk mirror and for RAM; 0 is "
            "unlimited")
    # To spare the VM's disk while it runs.
    backup_max_bandwidth: int = setting(
        0, env="VMTASK_BACKUP_MAX_BANDWIDTH", read=_integer(0),
        doc="bytes/s a backup may read, per disk; 0 is unlimited")
    # They wait on subprocesses and QMP, not on the CPU, so this is not tied to the
    # CPU count.
    concurrency: int = setting(
        4, env="VMTASK_CONCURRENCY", read=_integer(1),
        doc="long operations (copies, VM starts, saves) a worker runs at once "
            "(`-c` overrides)")
    # In their own lane, which never waits behind long work.
    control_concurrency: int = setting(
        4, env="VMTASK_CONTROL_CONCURRENCY", read=_integer(1),
        doc="quick operations (pause, turn off, disk info...) the host's control lane "
            "runs at once")
    # A message a worker took but never started (it died, or Redis restarted).  Safe
    # to keep short: a copy of a task that did start is dropped by the start gate.
    visibility_timeout_seconds: float = setting(
        30.0, env="VMTASK_VISIBILITY_TIMEOUT_SECONDS", read=_number(5.0),
        doc="a message taken but never started returns to its queue after this")
    redis_timeout_seconds: float = setting(
        5.0, env="VMTASK_REDIS_TIMEOUT_SECONDS", read=_number(0.5),
        doc="deadline of every Redis call (producer, CLI, worker): a frozen Redis fails "
            "calls after this long")
    sent_events: bool = setting(
        True, env="VMTASK_SENT_EVENTS", read=_flag,
        doc="producers send a `task-sent` event per task, so Flower lists queued tasks "
            "(`0` turns it off and enqueues about 1.2x faster)")
    # The control lane is started by the main worker itself, with "control".
    role: str = setting(
        "main", env="VMTASK_WORKER_ROLE", read=_choice(WORKER_ROLES),
        doc="`main` serves the host; `control` is the lane for quick operations that "
            "the main worker starts by itself (never set it by hand)")
    vnc_listen: str = setting(
        "127.0.0.1", env="VMTASK_VNC_LISTEN", read=_address,
        doc="the address VM consoles (VNC, a free port per VM from 5900) listen on")
    forward_listen: str = setting(
        "127.0.0.1", env="VMTASK_FORWARD_LISTEN", read=_address,
        doc="the address a VM's port forwards (`network=\"user\"`) listen on")
    advertise_address: str = setting(
        "127.0.0.1", env="VMTASK_ADVERTISE_ADDRESS", read=_address,
        doc="the address other hosts reach this host's transfers on (NBD exports for "
            "`copy_to` and migrations); exports bind to it and the heartbeat advertises it")
    transfer_ports: tuple[int, int] = setting(
        (49152, 49407), env="VMTASK_TRANSFER_PORTS", read=_port_range,
        doc="TCP port range (`LOW-HIGH`, inclusive) transfers listen on, one port per "
            "running transfer")
    # A partition between hosts stalls a TCP stream for many minutes without failing it.
    transfer_stall_seconds: float = setting(
        60.0, env="VMTASK_TRANSFER_STALL_SECONDS", read=_number(1.0),
        doc="a transfer (disk copy, cold migration, live migration) that moves nothing for "
            "this long ends TimeOutError")
    # At most one of the two transfer TLS settings; neither: plain TCP.
    transfer_tls_dir: str | None = setting(
        None, env="VMTASK_TRANSFER_TLS_DIR", read=_text,
        doc="certificates in QEMU's `tls-creds-x509` layout (`ca-cert.pem`, "
            "`server-cert.pem`, `server-key.pem`, `client-cert.pem`, `client-key.pem`): "
            "every transfer (copies, cold migrations, live migration's NBD and migration "
            "channels) is TLS with both ends verified; not together with "
            "`VMTASK_TRANSFER_PSK_DIR`; set on every host or none",
        shown="none (plain TCP)")
    transfer_psk_dir: str | None = setting(
        None, env="VMTASK_TRANSFER_PSK_DIR", read=_text,
        doc="a directory with QEMU's `keys.psk` (`qemu:<hex key>`), the same on every "
            "host: every transfer (copies, cold migrations, live migration's NBD and "
            "migration channels) is TLS with that pre-shared key; not together with "
            "`VMTASK_TRANSFER_TLS_DIR`; set on every host or none",
        shown="none (plain TCP)")
    console_log_max_bytes: int = setting(
        1024 * 1024, env="VMTASK_CONSOLE_LOG_MAX_BYTES", read=_integer(4096),
        doc="a VM's serial log is rotated past this size (one old generation kept)")
    redis_ca: str | None = setting(
        None, env="VMTASK_REDIS_CA", read=_text,
        doc="CA file that signs the Redis server's certificate (`rediss://` only)",
        shown="the system CAs")
    redis_cert: str | None = setting(
        None, env="VMTASK_REDIS_CERT", read=_text,
        doc="client certificate, when Redis asks for one (`rediss://` only)")
    redis_key: str | None = setting(
        None, env="VMTASK_REDIS_KEY", read=_text,
        doc="the client certificate's key (`rediss://` only)")
    # The password is kept in a file so that it stays out of the environment that
    # `docker inspect` and `ps e` show.
    redis_password_file: str | None = setting(
        None, env="VMTASK_REDIS_PASSWORD_FILE", read=_text,
        doc="file whose first line is the Redis password (a compose secret); the URL "
            "then carries none")
    redis_sentinel_master: str | None = setting(
        None, env="VMTASK_REDIS_SENTINEL_MASTER", read=_text,
        doc="the primary's master name, with a `sentinel://` URL (or `?master_name=` in "
            "the URL)")
    # A write that counts: a submitted task, a started or finished record.
    redis_wait_replicas: int | None = setting(
        None, env="VMTASK_REDIS_WAIT_REPLICAS", read=_integer(0),
        doc="replicas that must acknowledge a submit, a task's start and its result "
            "(`WAIT`) before they count",
        shown="1 with Sentinel, else 0")
    redis_wait_ms: int = setting(
        1000, env="VMTASK_REDIS_WAIT_MS", read=_integer(1),
        doc="how long a write waits for those replicas")
    # Then BrokerUnavailableError.  Sentinel URLs only.
    # None: 15 s with a Sentinel URL (failover tests count on submits riding one out),
    # 0 with one Redis, whose outage has no known end.
    redis_failover_seconds: float | None = setting(
        None, env="VMTASK_REDIS_FAILOVER_SECONDS", read=_number(0),
        doc="how long every entry point (library, CLI, worker) retries a Redis call whose "
            "connection was refused or cut (a failover, a restart) before "
            "`BrokerUnavailableError`, and a worker re-sends a start or result no replica "
            "acknowledged; a refused login is never retried",
        shown="15 with Sentinel, else 0 (fail at once)")

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
        values = {}
        for spec in fields(cls):
            factory = spec.default_factory
            default = factory() if callable(factory) else spec.default
            values[spec.name] = spec.metadata["read"](env, spec.metadata["env"], default)
        settings = cls(**values)
        if settings.transfer_tls_dir and settings.transfer_psk_dir:
            raise InvalidArgumentError(
                "Set VMTASK_TRANSFER_TLS_DIR (x509 certificates) or VMTASK_TRANSFER_PSK_DIR "
                "(a pre-shared key) for transfer TLS, not both")
        settings.endpoint  # noqa: B018 - a bad URL or TLS file fails at start-up, not later
        return settings


# VMTASK_* variables that are no settings, read elsewhere: the tiny test guest's
# build cache (workers.devtools.tinyguest) and the tests' QMP pause points.
OTHER_VARIABLES = ("VMTASK_CACHE_DIR", "VMTASK_TEST_PAUSE_BEFORE", "VMTASK_TEST_PAUSE_MARKER")
PREFIX = "VMTASK_"
REGENERATE = "vmtask config --markdown > docs/operations/configuration.md"


def variables() -> dict[str, Field[Any]]:
    """Each setting's variable, with its field."""
    return {spec.metadata["env"]: spec for spec in fields(Settings)}


def unknown_variables(env: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """The ``VMTASK_*`` names in ``env`` that nothing reads (likely misspelt), each
    with the closest known name, if one is close."""
    known = [*variables(), *OTHER_VARIABLES]
    # Compared without the prefix every name shares, which would make all look close.
    stems = {name.removeprefix(PREFIX): name for name in known}

    def closest(name: str) -> str | None:
        match = difflib.get_close_matches(name.removeprefix(PREFIX), stems, n=1)
        return stems[match[0]] if match else None

    return [(name, closest(name))
            for name in sorted(env) if name.startswith(PREFIX) and name not in known]


def as_text(value: Any) -> str:
    """A value as its variable would spell it ("" for unset)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, tuple):
        if len(value) == 2 and all(isinstance(item, int) for item in value):
            return f"{value[0]}-{value[1]}"
        return os.pathsep.join(str(item) for item in value)
    return str(value)


def effective(settings: Settings) -> dict[str, str]:
    """Each variable with the value ``settings`` holds, secrets redacted.  A password
    file is shown by its path: its contents never reach the result."""
    shown = {}
    for name, spec in variables().items():
        text = as_text(getattr(settings, spec.name))
        redact = spec.metadata["redact"]
        shown[name] = redact(text) if redact and text else text
    return shown


def configuration_page() -> str:
    """docs/operations/configuration.md: every variable, its meaning and default, from
    `Settings`."""
    rows = []
    for name, spec in variables().items():
        default = spec.metadata["shown"]
        if default is None:
            text = as_text(spec.default)
            default = f"`{text}`" if isinstance(spec.default, str | Path | tuple) and text \
                else text or "none"
        rows.append(f"| `{name}` | {spec.metadata['doc']} | {default} |")
    return "\n".join([
        "# Configuration",
        "",
        f"<!-- Generated from api/settings.py; do not edit. Regenerate: {REGENERATE} -->",
        "",
        "Producers, the CLI and workers read these variables (`api.settings.Settings`).",
        "`vmtask config` prints the values in effect, with secrets redacted; a worker",
        "warns at start about a `VMTASK_*` variable it does not know.",
        "",
        "| variable | meaning | default |",
        "| --- | --- | --- |",
        *rows,
        "",
    ])
