"""Host maintenance: a flag per host, kept in Redis until it is switched off.

While a host is in maintenance nothing new is placed or started there (VM
creation, startup, a VM moved or a disk copied onto it); moves off it still run,
which is how `VirtualServer.evacuate_host` drains it.  The flag is a field of one
hash without a TTL, so it outlives the host's workers, and Redis restarts where
Redis persists (AOF or RDB), until `set_maintenance(host, False)`.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from api.errors import HostUnavailableError
from api.protocol import keys


def in_maintenance(client: redis.Redis) -> dict[str, dict[str, Any]]:
    """Every host in maintenance, with what was recorded when it began."""
    raw = client.hgetall(keys.MAINTENANCE)
    found: dict[str, dict[str, Any]] = {}
    for host, value in raw.items():
        name = host.decode() if isinstance(host, bytes) else str(host)
        try:
            found[name] = dict(json.loads(value))
        except (ValueError, TypeError):
            found[name] = {}
    return found


def set_flag(client: redis.Redis, host: str, on: bool) -> None:
    if on:
        # HSETNX: switching it on twice keeps when it first began.
        client.hsetnx(keys.MAINTENANCE, host, json.dumps({"since": time.time()}))
    else:
        client.hdel(keys.MAINTENANCE, host)


def refusal(host: str, what: str) -> HostUnavailableError:
    return HostUnavailableError(
        f"Host {host} is in maintenance: {what} is refused there until "
        f"set_maintenance({host!r}, False)")
