"""Producer-side checks of a VM's configuration, shared by create and configure.

Each raises `errors.InvalidArgumentError` before anything is queued or written;
the worker's `VMConfig` checks the same rules again before QEMU starts.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from typing import Any

from api.arguments import check_relative_path, format_for_name
from api.errors import InvalidArgumentError
from api.protocol.vm import Field

MAX_DISKS = 16
MAX_MEMORY_MB = 1024 * 1024
MAX_CPUS = 255
NETWORK_USER = "user"
NETWORK_NONE = "none"  # the spelling of "no NIC" where None means "unchanged"
BRIDGE_PREFIX = "bridge:"
_BRIDGE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def check_memory(memory_mb: object) -> int:
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) \
            or not 1 <= memory_mb <= MAX_MEMORY_MB:
        raise InvalidArgumentError(f"memory_mb must be an int in 1..{MAX_MEMORY_MB}, "
                                   f"not {memory_mb!r}")
    return memory_mb


def check_cpus(cpus: object) -> int:
    if isinstance(cpus, bool) or not isinstance(cpus, int) or not 1 <= cpus <= MAX_CPUS:
        raise InvalidArgumentError(f"cpus must be an int in 1..{MAX_CPUS}, not {cpus!r}")
    return cpus


def check_disks(disks: object) -> list[str]:
    if isinstance(disks, str | bytes) or not isinstance(disks, list | tuple):
        raise InvalidArgumentError(
            f"disks must be a list or tuple of paths, not {type(disks).__name__}")
    if len(disks) > MAX_DISKS:
        raise InvalidArgumentError(f"A VM takes at most {MAX_DISKS} disks")
    disk_list = [check_relative_path(d, "disk") for d in disks]
    for disk in disk_list:
        format_for_name(disk)
    if len(set(disk_list)) != len(disk_list):
        raise InvalidArgumentError("A disk is attached twice")
    return disk_list


def check_network(network: object) -> str | None:
    """None (no NIC), "user" or "bridge:NAME"; "none" is read as None."""
    if network is None or network == NETWORK_NONE:
        return None
    if network == NETWORK_USER:
        return NETWORK_USER
    if isinstance(network, str) and network.startswith(BRIDGE_PREFIX):
        bridge = network[len(BRIDGE_PREFIX):]
        if _BRIDGE_RE.match(bridge) and bridge not in (".", ".."):
            return network
    raise InvalidArgumentError(
        f"network must be None, 'user' or 'bridge:NAME' (a host bridge of at most 15 "
        f"letters, digits, '_', '.' or '-'), not {network!r}")


def check_port_forwards(forwards: object, network: str | None) -> list[list[int]]:
    """``{host_tcp_port: guest_tcp_port}`` as sorted pairs; only for network="user"."""
    if forwards is None:
        return []
    if not isinstance(forwards, Mapping):
        raise InvalidArgumentError("port_forwards must be a dict {host_tcp_port: guest_tcp_port}")
    pairs: list[list[int]] = []
    for host_port, guest_port in forwards.items():
        for port in (host_port, guest_port):
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise InvalidArgumentError(f"A forwarded port must be an int in 1..65535, "
                                           f"not {port!r}")
        pairs.append([host_port, guest_port])
    if pairs and network != NETWORK_USER:
        raise InvalidArgumentError("port_forwards need network='user' "
                                   "(pass port_forwards={} to drop them)")
    return sorted(pairs)


def new_mac() -> str:
    """A random MAC in QEMU's locally administered range, fixed for the VM's life."""
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


def config_fields(*, memory_mb: int, cpus: int, disks: list[str], network: str | None,
                  forwards: list[list[int]]) -> dict[str, str]:
    """The VM record's configuration fields, as stored in Redis."""
    return {
        Field.MEMORY_MB: str(memory_mb), Field.CPUS: str(cpus), Field.DISKS: json.dumps(disks),
        Field.NETWORK: network or "", Field.PORT_FORWARDS: json.dumps(forwards),
    }


def forwards_of(record: Mapping[str, str]) -> dict[int, int]:
    raw = record.get(Field.PORT_FORWARDS) or "[]"
    return {int(h): int(g) for h, g in json.loads(raw)} if raw != "[]" else {}


def to_args(fields: Mapping[str, Any]) -> list[Any]:
    args: list[Any] = []
    for key, value in fields.items():
        args += [key, value]
    return args
