"""How many Redis connections this process holds, as Redis itself lists them.

Tests and benchmarks count a producer's connections through ``CLIENT LIST``: each
entry whose client port is a TCP socket open in this process, except the one
asking.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import redis


def _own_socket_inodes() -> set[str]:
    inodes: set[str] = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def _own_local_ports() -> set[int]:
    inodes = _own_socket_inodes()
    ports: set[int] = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def own_connection_list(client: redis.Redis) -> list[dict[str, Any]]:
    """``CLIENT LIST``'s entries of the connections this process holds to ``client``'s
    Redis, ``client``'s own excluded."""
    me = client.client_id()
    ports = _own_local_ports()
    return [entry for entry in client.client_list()
            if int(entry["id"]) != me
            and int(str(entry.get("addr", ":0")).rsplit(":", 1)[1]) in ports]


def own_connections(client: redis.Redis) -> int:
    return len(own_connection_list(client))
