"""Where Redis is and how to reach it: one validated URL plus its TLS options.

Every client of Redis in vmtask (the producer's redis-py client and Celery app, the
worker's Celery app and redis-py clients, the CLI, Flower through the worker app)
gets its connection from a `RedisEndpoint` built here, so a URL is judged once
and means the same everywhere.

- A bad URL raises `InvalidArgumentError` here, never a bare ``ValueError`` or
  ``RedisError`` from redis-py, kombu or Celery later.
- TLS options are taken out of the URL's query and handed to each library as
  keyword arguments (redis-py) or ``broker_use_ssl`` / ``redis_backend_use_ssl``
  (Celery, kombu, Flower).  The libraries disagree on the spelling of
  ``ssl_cert_reqs`` (redis-py takes ``required``, Celery's docs say
  ``CERT_REQUIRED``) and on the default (Celery refuses a ``rediss://`` URL
  without it; kombu falls back to no verification): here both spellings work and
  a plain ``rediss://`` URL verifies the server against the system CAs.
- A Sentinel URL (``sentinel://[:password@]s1:26379[/db];sentinel://s2:26379;...``)
  names the sentinels and, with a master name, the primary they elect: redis-py's
  `redis.sentinel.Sentinel` and kombu's Sentinel transport find the current
  primary on every (re)connect, so every client follows a failover.
"""

from __future__ import annotations

import math
import os
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.connection import parse_url
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

from api.errors import InvalidArgumentError

T = TypeVar("T")
SCHEMES = ("redis", "rediss", "unix", "sentinel")
SENTINEL_PORT = 26379
# A Sentinel failover (a few seconds) is ridden out for this long by default.
SENTINEL_FAILOVER_SECONDS = 15.0
MASTER_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TLS_FILE_PARAMETERS = {"ssl_ca_certs": "CA", "ssl_certfile": "client certificate",
                       "ssl_keyfile": "client key"}
CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL,
             "none": ssl.CERT_NONE}
# A value copied from .env.example or a secrets template is not a password.
PLACEHOLDER_MARK = "change-me"


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs and error messages: the one in
    its user part and one given in its query (redis-py reads ``?password=``)."""
    if ";" in url:  # a Sentinel URL: one URL per sentinel
        return ";".join(redact_url(part) for part in url.split(";"))
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparsable URL>"
    if password is not None:
        netloc = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{netloc}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any("password" in key.lower() for key, _ in query):
        hidden = [(key, "***" if "password" in key.lower() else value) for key, value in query]
        parts = parts._replace(query=urlencode(hidden, safe="*"))
    return urlunsplit(parts)


def cert_reqs(value: str) -> ssl.VerifyMode:
    """``required|optional|none``, or Celery's ``CERT_REQUIRED`` spellings."""
    word = value.strip().lower().removeprefix("cert_")
    if word not in CERT_REQS:
        raise InvalidArgumentError(
            f"ssl_cert_reqs must be one of required, optional, none (or CERT_REQUIRED, "
            f"CERT_OPTIONAL, CERT_NONE), not {value!r}")
    return CERT_REQS[word]


def check_placeholder(what: str, secret: str | None) -> None:
    if secret and PLACEHOLDER_MARK in secret.lower():
        raise InvalidArgumentError(
            f"{what} is still a placeholder ({PLACEHOLDER_MARK}...): set a real secret")


def read_secret_file(variable: str, path: str) -> str:
    """A secret kept in a file (a compose secret): its first line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"{variable}: cannot read {path!r}: {exc}") from None
    secret = text.splitlines()[0].strip() if text.strip() else ""
    if not secret:
        raise InvalidArgumentError(f"{variable}: {path!r} is empty")
    check_placeholder(f"The secret in {variable} ({path})", secret)
    return secret


def _readable_file(what: str, path: str) -> str:
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise InvalidArgumentError(f"The Redis TLS {what} {path!r} is not a readable file")
    return path


class PrimaryFollowingConnection(SentinelManagedConnection):  # type: ignore[misc]
    """A Sentinel-managed connection that asks the sentinels on *every* reconnect.

    redis-py 6.4 reconnects a dropped connection from ``send_packed_command``
    through ``connect_check_health``, which skips `SentinelManagedConnection.connect`
    (the one place that asks the sentinels) and keeps retrying the address of the
    primary that just died: a client in mid-command when the primary was killed
    then fails after its whole retry budget (about 15 s) even though a new primary
    was elected in 2.  Here every reconnect goes through the sentinels.
    """

    def connect_check_health(self, check_health: bool = True,
                             retry_socket_connect: bool = True) -> None:
        if retry_socket_connect:  # the generic path: find the primary first
            self.connect()
            return
        super().connect_check_health(check_health=check_health,
                                     retry_socket_connect=retry_socket_connect)


@dataclass(frozen=True)
class SentinelTarget:
    """The sentinels to ask and the primary (by master name) they elect."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class RedisEndpoint:
    """A validated Redis URL and the TLS options that go with it.

    ``url`` has no TLS parameters left in its query and may carry credentials:
    show `redacted`, never ``url``.
    """

    url: str
    tls: Mapping[str, Any] | None = field(default=None)
    sentinel: SentinelTarget | None = field(default=None)
    # Replicas that must acknowledge a write the application relies on (WAIT), and
    # how long to wait for them: 1 with Sentinel, none with a single Redis.
    wait_replicas: int = 0
    wait_ms: int = 1000
    # How long a client keeps retrying a call whose connection Redis refused or cut
    # (a failover, a restart): every entry point alike; 0 fails at once.
    failover_seconds: float = 0.0

    @property
    def redacted(self) -> str:
        return redact_url(self.url)

    def client(self, timeout: float, **options: Any) -> redis.Redis:
        """A redis-py client whose every call fails after ``timeout`` seconds.

        With Sentinel, each new connection asks the sentinels for the current
        primary, and a connection to a primary that was demoted fails (READONLY is
        turned into a ConnectionError by redis-py), so a retry reaches the new one.
        """
        if self.sentinel is not None:
            target = self.sentinel
            options.setdefault("retry", failover_retry(self.failover_seconds))
            manager = Sentinel(
                list(target.sentinels),
                sentinel_kwargs={"socket_timeout": timeout,
                                 "socket_connect_timeout": timeout},
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
            )
            return manager.master_for(target.master, db=target.db, username=target.username,
                                      password=target.password,
                                      connection_class=PrimaryFollowingConnection, **options)
        if self.failover_seconds > 0:
            # Refused or cut connections only: a frozen Redis already costs a
            # whole timeout per try.
            # (redis-py retries a connect on the socket's own errors.)
            options.setdefault("retry", failover_retry(self.failover_seconds, (
                redis.ConnectionError, ConnectionRefusedError, ConnectionResetError)))
        return redis.Redis.from_url(
            self.url,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            **dict(self.tls or {}),
            **options,
        )

    def celery_ssl(self) -> dict[str, Any] | None:
        """``broker_use_ssl`` / ``redis_backend_use_ssl`` for Celery, kombu and Flower."""
        return dict(self.tls) if self.tls is not None else None

    def celery_transport_options(self, timeout: float) -> dict[str, Any]:
        """What kombu's transport needs besides the URL: the master name with Sentinel."""
        options: dict[str, Any] = {"socket_timeout": timeout,
                                   "socket_connect_timeout": timeout}
        if self.sentinel is not None:
            options["master_name"] = self.sentinel.master
            options["sentinel_kwargs"] = {"socket_timeout": timeout,
                                          "socket_connect_timeout": timeout}
        return options


class TransientRetry(Retry):  # type: ignore[misc]
    """redis-py's `Retry`, except for a refused login: redis-py makes a wrong password
    or a disabled user a ConnectionError, but waiting will not fix it."""

    def call_with_retry(self, do: Callable[[], T], fail: Callable[[Exception], Any]) -> T:
        def once() -> T:
            try:
                return do()
            except (redis.exceptions.AuthenticationError,
                    redis.exceptions.AuthorizationError) as exc:
                raise _Refused(exc) from exc

        try:
            result: T = super().call_with_retry(once, fail)
        except _Refused as refused:
            fail(refused.refusal)
            raise refused.refusal from None
        return result


class _Refused(Exception):
    """Carries a refused login through `Retry.call_with_retry`, which catches ConnectionError."""

    def __init__(self, refusal: Exception) -> None:
        super().__init__(str(refusal))
        self.refusal = refusal


def failover_retry(seconds: float, errors: tuple[type[Exception], ...] = (
        redis.ConnectionError, redis.TimeoutError)) -> Retry:
    """Retries spread over ``seconds`` (short pauses, at most 0.5 s): a Sentinel
    failover or a Redis restart takes a few seconds, during which connections are
    refused.  A refused login is not retried."""
    retries = 4 + math.ceil(max(0.0, seconds - 0.75) / 0.5)
    return TransientRetry(ExponentialBackoff(cap=0.5, base=0.05), retries,
                          supported_errors=errors)


def no_retry() -> Retry:
    """For a write whose acknowledgement must come from the server that took it."""
    return Retry(NoBackoff(), 0)


def parse_redis_url(
    url: object,
    *,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    password: str | None = None,
    master: str | None = None,
    wait_replicas: int | None = None,
    wait_ms: int = 1000,
    failover_seconds: float | None = None,
) -> RedisEndpoint:
    """Validate ``url`` and combine it with TLS files and a password kept elsewhere.

    ``ca``, ``cert`` and ``key`` (``VMTASK_REDIS_CA`` / ``_CERT`` / ``_KEY``) are
    defaults for the URL's ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``;
    ``password`` (from ``VMTASK_REDIS_PASSWORD_FILE``) goes into a URL without one.
    ``master`` (``VMTASK_REDIS_SENTINEL_MASTER``) names the primary of a Sentinel
    URL, unless the URL says ``?master_name=``.  ``wait_replicas`` (default: 1 with
    Sentinel, else 0) replicas must acknowledge writes that count, within ``wait_ms``.
    ``failover_seconds`` (``VMTASK_REDIS_FAILOVER_SECONDS``): how long a refused or
    cut connection is retried; default 15 s with Sentinel, 0 (fail at once) else.
    """
    if not isinstance(url, str) or not url:
        raise InvalidArgumentError(f"The Redis URL must be a non-empty string, not {url!r}")
    try:
        url.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgumentError("The Redis URL is not valid text (a lone surrogate)") from None
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise InvalidArgumentError(f"The Redis URL {redact_url(url)!r} contains blanks or "
                                   "control characters")
    if url.lower().startswith("sentinel://"):
        return _parse_sentinel_url(url, ca=ca, cert=cert, key=key, password=password,
                                   master=master, wait_replicas=wait_replicas, wait_ms=wait_ms,
                                   failover_seconds=(SENTINEL_FAILOVER_SECONDS
                                                      if failover_seconds is None
                                                      else failover_seconds))
    failover_seconds = 0.0 if failover_seconds is None else failover_seconds
    if master is not None:
        raise InvalidArgumentError("A Sentinel master name (VMTASK_REDIS_SENTINEL_MASTER) "
                                   "needs a sentinel:// URL")
    try:
        parts = urlsplit(url)
        url_password = parts.password
        parts.port  # noqa: B018 - raises ValueError when out of range
    except ValueError as exc:
        raise InvalidArgumentError(f"Invalid Redis URL {redact_url(url)!r}: {exc}") from None
    if parts.scheme not in SCHEMES:
        raise InvalidArgumentError(
            f"{redact_url(url)!r} is not a Redis URL (use {', '.join(SCHEMES)}://)")
    if parts.scheme != "unix":
        if not parts.hostname:
            raise InvalidArgumentError(f"The Redis URL {redact_url(url)!r} names no host")
        # redis-py ignores a database that is not a number; Celery fails on it later.
        if parts.path.strip("/") and not re.fullmatch(r"[0-9]+", parts.path.strip("/")):
            raise InvalidArgumentError(
                f"The Redis URL {redact_url(url)!r}: the database must be a number")
    query = parse_qsl(parts.query, keep_blank_values=True)
    tls_given = {k: v for k, v in query if k.startswith("ssl_")}
    rest = [(k, v) for k, v in query if not k.startswith("ssl_")]
    unknown = sorted(set(tls_given) - {*TLS_FILE_PARAMETERS, "ssl_cert_reqs"})
    if unknown:
        raise InvalidArgumentError(f"Unknown TLS parameter(s) in the Redis URL: {unknown}")
    check_placeholder("The Redis password in the URL", url_password)
    netloc = parts.netloc
    if password is not None:
        if url_password is not None:
            raise InvalidArgumentError(
                "The Redis password is given twice: in the URL and in a password file")
        check_placeholder("The Redis password", password)
        host_part = netloc.rsplit("@", 1)[-1]
        user = quote(parts.username or "", safe="")
        netloc = f"{user}:{quote(password, safe='')}@{host_part}"
    clean = urlunsplit(parts._replace(netloc=netloc, query=urlencode(rest)))
    try:
        parse_url(clean)  # redis-py's own reading: scheme, port, db, query values
    except ValueError as exc:
        raise InvalidArgumentError(f"Invalid Redis URL {redact_url(url)!r}: {exc}") from None

    files = {"ssl_ca_certs": ca, "ssl_certfile": cert, "ssl_keyfile": key}
    files.update({k: v for k, v in tls_given.items() if k in TLS_FILE_PARAMETERS})
    given = {k: v for k, v in files.items() if v}
    if parts.scheme != "rediss":
        if tls_given or given:
            raise InvalidArgumentError(
                f"TLS options ({', '.join(sorted({*tls_given, *given}))}) need a rediss:// "
                f"URL, not {parts.scheme}://")
        return RedisEndpoint(clean, wait_replicas=wait_replicas or 0, wait_ms=wait_ms,
                             failover_seconds=failover_seconds)
    if given.get("ssl_keyfile") and not given.get("ssl_certfile"):
        raise InvalidArgumentError("A Redis TLS client key needs its certificate "
                                   "(VMTASK_REDIS_CERT or ssl_certfile)")
    tls: dict[str, Any] = {
        k: _readable_file(TLS_FILE_PARAMETERS[k], v) for k, v in given.items()}
    # Verify the server unless told otherwise: against the given CA, else the system's.
    tls["ssl_cert_reqs"] = cert_reqs(tls_given.get("ssl_cert_reqs", "required"))
    return RedisEndpoint(clean, tls, wait_replicas=wait_replicas or 0, wait_ms=wait_ms,
                         failover_seconds=failover_seconds)


def _parse_sentinel_url(url: str, *, ca: str | None, cert: str | None, key: str | None,
                        password: str | None, master: str | None, wait_replicas: int | None,
                        wait_ms: int, failover_seconds: float) -> RedisEndpoint:
    """``sentinel://[user:password@]host[:port][/db][?master_name=N];sentinel://host[:port]...``

    Credentials and the database go on the first sentinel (they are the primary's,
    as in kombu); later entries name further sentinels only.
    """
    if ca or cert or key:
        raise InvalidArgumentError("TLS (VMTASK_REDIS_CA/CERT/KEY) is not supported with "
                                   "Sentinel URLs yet")
    sentinels: list[tuple[str, int]] = []
    username: str | None = None
    url_password: str | None = None
    db = 0
    url_master: str | None = None
    for index, part in enumerate(url.split(";")):
        try:
            parts = urlsplit(part)
            port = parts.port
        except ValueError as exc:
            raise InvalidArgumentError(
                f"Invalid Sentinel URL {redact_url(url)!r}: {exc}") from None
        if parts.scheme != "sentinel":
            raise InvalidArgumentError(
                f"{redact_url(part)!r}: every entry of a Sentinel URL is sentinel://host:port")
        if not parts.hostname:
            raise InvalidArgumentError(f"The Sentinel URL {redact_url(part)!r} names no host")
        path = parts.path.strip("/")
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        if index == 0:
            username = unquote(parts.username) if parts.username else None
            url_password = unquote(parts.password) if parts.password is not None else None
            if path and not re.fullmatch(r"[0-9]+", path):
                raise InvalidArgumentError(
                    f"The Sentinel URL {redact_url(part)!r}: the database must be a number")
            db = int(path or 0)
            url_master = query.pop("master_name", None)
            if query:
                raise InvalidArgumentError(
                    f"Unknown parameter(s) in the Sentinel URL: {sorted(query)}")
        elif parts.username or parts.password or path or query:
            raise InvalidArgumentError(
                f"{redact_url(part)!r}: only the first sentinel of a Sentinel URL carries "
                "credentials, a database or parameters")
        sentinels.append((parts.hostname, port or SENTINEL_PORT))
    if url_master is not None and master is not None and url_master != master:
        raise InvalidArgumentError(f"The Sentinel master is named twice: {url_master!r} in the "
                                   f"URL and {master!r} in VMTASK_REDIS_SENTINEL_MASTER")
    name = url_master or master
    if not name:
        raise InvalidArgumentError("A Sentinel URL needs the primary's master name: set "
                                   "VMTASK_REDIS_SENTINEL_MASTER or ?master_name= in the URL")
    if not MASTER_NAME_PATTERN.match(name):
        raise InvalidArgumentError(f"Invalid Sentinel master name {name!r}")
    check_placeholder("The Redis password in the URL", url_password)
    if password is not None:
        if url_password is not None:
            raise InvalidArgumentError(
                "The Redis password is given twice: in the URL and in a password file")
        check_placeholder("The Redis password", password)
        url_password = password
    auth = ""
    if url_password is not None or username:
        auth = (f"{quote(username or '', safe='')}:"
                f"{quote(url_password or '', safe='')}@")
    # kombu rotates through the entries when one fails and then reads the password
    # and database from the entry it uses: every entry carries them.
    kombu_url = ";".join(f"sentinel://{auth}{_netloc(host, port)}/{db}"
                         for host, port in sentinels)
    replicas = 1 if wait_replicas is None else wait_replicas
    if replicas < 0 or wait_ms < 1:
        raise InvalidArgumentError("Replica acknowledgements need replicas >= 0 and a "
                                   "timeout of at least 1 ms")
    target = SentinelTarget(tuple(sentinels), name, db, username, url_password)
    return RedisEndpoint(kombu_url, None, target, replicas, wait_ms, failover_seconds)


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
