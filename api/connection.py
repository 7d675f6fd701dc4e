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
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import redis
from redis.connection import parse_url

from api.errors import InvalidArgumentError

SCHEMES = ("redis", "rediss", "unix")
TLS_FILE_PARAMETERS = {"ssl_ca_certs": "CA", "ssl_certfile": "client certificate",
                       "ssl_keyfile": "client key"}
CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL,
             "none": ssl.CERT_NONE}
# A value copied from .env.example or a secrets template is not a password.
PLACEHOLDER_MARK = "change-me"


def redact_url(url: str) -> str:
    """The URL with any password replaced, for logs and error messages."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparsable URL>"
    if password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


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


@dataclass(frozen=True)
class RedisEndpoint:
    """A validated Redis URL and the TLS options that go with it.

    ``url`` has no TLS parameters left in its query and may carry credentials:
    show `redacted`, never ``url``.
    """

    url: str
    tls: Mapping[str, Any] | None = field(default=None)

    @property
    def redacted(self) -> str:
        return redact_url(self.url)

    def client(self, timeout: float, **options: Any) -> redis.Redis:
        """A redis-py client whose every call fails after ``timeout`` seconds."""
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


def parse_redis_url(
    url: object,
    *,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    password: str | None = None,
) -> RedisEndpoint:
    """Validate ``url`` and combine it with TLS files and a password kept elsewhere.

    ``ca``, ``cert`` and ``key`` (``VMTASK_REDIS_CA`` / ``_CERT`` / ``_KEY``) are
    defaults for the URL's ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``;
    ``password`` (from ``VMTASK_REDIS_PASSWORD_FILE``) goes into a URL without one.
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
        return RedisEndpoint(clean)
    if given.get("ssl_keyfile") and not given.get("ssl_certfile"):
        raise InvalidArgumentError("A Redis TLS client key needs its certificate "
                                   "(VMTASK_REDIS_CERT or ssl_certfile)")
    tls: dict[str, Any] = {
        k: _readable_file(TLS_FILE_PARAMETERS[k], v) for k, v in given.items()}
    # Verify the server unless told otherwise: against the given CA, else the system's.
    tls["ssl_cert_reqs"] = cert_reqs(tls_given.get("ssl_cert_reqs", "required"))
    return RedisEndpoint(clean, tls)
