"""What a VM is made of (`VMConfig`) and where its runtime files live (`VMPaths`).

Also the configuration fingerprint a saved state is bound to, and the disk format
QEMU is told for each disk (from its extension, never probed).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from api.enums import ACCELERATORS
from workers.engines.qemu_img import format_for
from workers.failures import IllegalValue

QEMU_SYSTEM = "qemu-system-x86_64"

DISK_INTERFACES = ("virtio", "ide")
MAX_IDE_DISKS = 4
MAX_MEMORY_MB = 4 * 1024 * 1024  # 4 TiB: far beyond any host, catches unit mistakes
MAX_CPUS = 255  # the i440fx machine's limit without an IOMMU
# "user" (QEMU's user-mode NAT) or "bridge:NAME" (a tap on a host bridge); None: no NIC.
NETWORK_USER = "user"
BRIDGE_PREFIX = "bridge:"
BRIDGE_HELPER = "/usr/lib/qemu/qemu-bridge-helper"

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9 _.()+-]{0,63}$")
_MACHINE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# Linux interface names: at most 15 bytes (IFNAMSIZ - 1), no '/', ':' or blanks.
_BRIDGE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_MAC_RE = re.compile(r"^52:54:00(:[0-9a-f]{2}){3}$")
_LISTEN_RE = re.compile(r"^[A-Za-z0-9.:-]{1,64}$")


def bridge_name(network: str | None) -> str | None:
    """The bridge of a ``bridge:NAME`` network, else None."""
    if network is None or not network.startswith(BRIDGE_PREFIX):
        return None
    return network[len(BRIDGE_PREFIX):]


def check_network(network: object) -> None:
    if network is None or network == NETWORK_USER:
        return
    if isinstance(network, str):
        bridge = bridge_name(network)
        if bridge is not None and _BRIDGE_RE.match(bridge) and bridge not in (".", ".."):
            return
    raise IllegalValue(
        f"Illegal network {network!r}: None, {NETWORK_USER!r} or 'bridge:NAME' "
        "(a host bridge of at most 15 letters, digits, '_', '.' or '-')"
    )


def check_port_forwards(forwards: object, network: object) -> None:
    if not isinstance(forwards, tuple):
        raise IllegalValue("port_forwards must be pairs of (host port, guest port)")
    if forwards and network != NETWORK_USER:
        raise IllegalValue("Port forwards need network='user'")
    hosts: set[int] = set()
    for pair in forwards:
        if (not isinstance(pair, tuple) or len(pair) != 2
                or not all(isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535
                           for p in pair)):
            raise IllegalValue(f"Illegal port forward {pair!r}: two TCP ports in 1..65535")
        if pair[0] in hosts:
            raise IllegalValue(f"Host port {pair[0]} is forwarded twice")
        hosts.add(pair[0])


def disk_format(path: str | os.PathLike[str]) -> str:
    """QEMU's block driver for a disk image, chosen by its extension (IllegalValue if none)."""
    return format_for(path)


def _require_absolute(what: str, value: object) -> None:
    if not isinstance(value, str) or not value or "\0" in value or not os.path.isabs(value):
        raise IllegalValue(f"{what} must be an absolute path, got {value!r}")


@dataclass(frozen=True)
class VMConfig:
    """What a VM is made of.  Stored in Redis as JSON (`to_json` / `from_json`).

    ``disks`` and ``extra_args`` accept any sequence and are kept as tuples so the
    configuration stays immutable and comparable.  ``extra_args`` are appended to
    QEMU's command line verbatim (e.g. a virtio-serial port for a guest agent).
    """

    name: str
    memory_mb: int
    disks: Sequence[str] = ()
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    extra_args: Sequence[str] = ()
    accel: str = "auto"
    machine: str = "pc"
    disk_interface: str = "virtio"
    cpus: int = 1
    network: str | None = None
    """None (no NIC), "user" or "bridge:NAME"."""
    port_forwards: Sequence[Sequence[int]] = ()
    """(host TCP port, guest TCP port) pairs, for the "user" network."""
    mac: str | None = None
    """The NIC's MAC address; QEMU picks one when None."""
    forward_listen: str = "127.0.0.1"
    """The host address port forwards listen on."""
    vga: bool = False
    """A standard VGA display device: what screendump and VNC show."""
    vnc_listen: str | None = None
    """The address a password-protected VNC server listens on (a free port); None: no VNC."""

    def __post_init__(self) -> None:
        if isinstance(self.disks, str) or isinstance(self.extra_args, str):
            raise IllegalValue("disks and extra_args must be sequences of strings, not a string")
        object.__setattr__(self, "disks", tuple(self.disks))
        object.__setattr__(self, "extra_args", tuple(self.extra_args))
        if isinstance(self.port_forwards, str):
            raise IllegalValue("port_forwards must be pairs of ports")
        object.__setattr__(self, "port_forwards", tuple(
            tuple(pair) if isinstance(pair, list | tuple) else pair
            for pair in self.port_forwards))
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise IllegalValue(
                f"Illegal VM name {self.name!r}: 1-64 characters of letters, digits, "
                "space and _.()+- , not starting with a dot, space or sign"
            )
        if (
            isinstance(self.memory_mb, bool)
            or not isinstance(self.memory_mb, int)
            or not 1 <= self.memory_mb <= MAX_MEMORY_MB
        ):
            raise IllegalValue(f"Illegal memory size {self.memory_mb!r} MB (1..{MAX_MEMORY_MB})")
        seen: set[str] = set()
        for disk in self.disks:
            if not isinstance(disk, str):
                raise IllegalValue(f"Disk paths must be strings, got {disk!r}")
            _require_absolute("A disk path", disk)
            disk_format(disk)
            if disk in seen:
                raise IllegalValue(f"Disk {disk} is attached twice")
            seen.add(disk)
        if self.disk_interface not in DISK_INTERFACES:
            raise IllegalValue(
                f"Illegal disk interface {self.disk_interface!r}: one of {DISK_INTERFACES}"
            )
        if self.disk_interface == "ide" and len(self.disks) > MAX_IDE_DISKS:
            raise IllegalValue(f"At most {MAX_IDE_DISKS} IDE disks, got {len(self.disks)}")
        for what, value in (("kernel", self.kernel), ("initrd", self.initrd)):
            if value is not None:
                _require_absolute(f"The {what} path", value)
        if self.kernel is None and (self.initrd is not None or self.append is not None):
            raise IllegalValue("initrd and append need a kernel (direct kernel boot)")
        if self.append is not None and not isinstance(self.append, str):
            raise IllegalValue("append must be a string")
        if not all(isinstance(arg, str) and "\0" not in arg for arg in self.extra_args):
            raise IllegalValue("extra_args must be strings")
        if self.accel not in ACCELERATORS:
            raise IllegalValue(f"Illegal accelerator {self.accel!r}: one of {ACCELERATORS}")
        if not isinstance(self.machine, str) or not _MACHINE_RE.match(self.machine):
            raise IllegalValue(f"Illegal machine type {self.machine!r}")
        if isinstance(self.cpus, bool) or not isinstance(self.cpus, int) \
                or not 1 <= self.cpus <= MAX_CPUS:
            raise IllegalValue(f"Illegal CPU count {self.cpus!r} (1..{MAX_CPUS})")
        check_network(self.network)
        check_port_forwards(self.port_forwards, self.network)
        if self.mac is not None and (not isinstance(self.mac, str) or not _MAC_RE.match(self.mac)):
            raise IllegalValue(f"Illegal MAC address {self.mac!r} (52:54:00:xx:xx:xx)")
        for what, address in (("forward", self.forward_listen), ("VNC", self.vnc_listen)):
            if address is not None and (not isinstance(address, str)
                                        or not _LISTEN_RE.match(address)):
                raise IllegalValue(f"Illegal {what} listen address {address!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "memory_mb": self.memory_mb,
            "disks": list(self.disks),
            "kernel": self.kernel,
            "initrd": self.initrd,
            "append": self.append,
            "extra_args": list(self.extra_args),
            "accel": self.accel,
            "machine": self.machine,
            "disk_interface": self.disk_interface,
            "cpus": self.cpus,
            "network": self.network,
            "port_forwards": [list(pair) for pair in self.port_forwards],
            "mac": self.mac,
            "forward_listen": self.forward_listen,
            "vga": self.vga,
            "vnc_listen": self.vnc_listen,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VMConfig:
        if not isinstance(data, Mapping):
            raise IllegalValue(
                f"A VM configuration must be a JSON object, got {type(data).__name__}"
            )
        allowed = set(cls.__dataclass_fields__)
        unknown = set(data) - allowed
        if unknown:
            raise IllegalValue(f"Unknown VM configuration keys: {sorted(unknown)}")
        missing = {"name", "memory_mb"} - set(data)
        if missing:
            raise IllegalValue(f"VM configuration lacks {sorted(missing)}")
        for key in ("disks", "extra_args", "port_forwards"):
            if key in data and not isinstance(data[key], list | tuple):
                raise IllegalValue(f"{key} must be a list")
        return cls(**dict(data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> VMConfig:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise IllegalValue(f"VM configuration is not valid JSON: {exc}") from None
        return cls.from_dict(data)


def fingerprint_fields(config: VMConfig) -> dict[str, Any]:
    # Everything that shapes the guest's RAM layout and device model: QEMU can only
    # load a state into the same machine.  Name and accelerator are deliberately out.
    return {
        "memory_mb": config.memory_mb,
        "disks": [[disk, disk_format(disk)] for disk in config.disks],
        "disk_interface": config.disk_interface,
        "kernel": config.kernel,
        "initrd": config.initrd,
        "append": config.append,
        "extra_args": list(config.extra_args),
        "machine": config.machine,
        "cpus": config.cpus,
        # The NIC and its backend are in the migration stream (slirp saves its
        # state); forwards are host-side, but kept in so a restore never differs.
        "network": config.network,
        "port_forwards": [list(pair) for pair in config.port_forwards],
        "mac": config.mac,
        "vga": config.vga,
    }


def config_fingerprint(config: VMConfig) -> str:
    """SHA-256 over the configuration a saved state depends on."""
    canonical = json.dumps(fingerprint_fields(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class VMPaths:
    """A VM's runtime directory, ``<storage root>/vms/<name>/``, and the files in it."""

    directory: Path

    @classmethod
    def for_vm(cls, storage_root: str | os.PathLike[str], name: str) -> VMPaths:
        if not _NAME_RE.match(name):
            raise IllegalValue(f"Illegal VM name {name!r}")
        return cls(Path(storage_root).absolute() / "vms" / name)

    def __post_init__(self) -> None:
        object.__setattr__(self, "directory", Path(self.directory).absolute())

    @property
    def qmp_socket(self) -> Path:
        return self.directory / "qmp.sock"

    @property
    def pidfile(self) -> Path:
        return self.directory / "qemu.pid"

    @property
    def serial_log(self) -> Path:
        return self.directory / "serial.log"

    @property
    def qemu_log(self) -> Path:
        """QEMU's own stderr once daemonized (``-D``); rewritten at each start."""
        return self.directory / "qemu.log"

    @property
    def launch_log(self) -> Path:
        """The launcher's stdout/stderr: errors raised before QEMU daemonizes."""
        return self.directory / "launch.log"

    @property
    def serial_log_rotated(self) -> Path:
        """The previous generation of the serial log, kept when it is rotated."""
        return self.directory / "serial.log.1"

    @property
    def screendump_file(self) -> Path:
        return self.directory / "screen.png"

    @property
    def state_file(self) -> Path:
        return self.directory / "saved.state"

    @property
    def state_tmp(self) -> Path:
        return self.directory / "saved.state.tmp"

    @property
    def fingerprint_file(self) -> Path:
        return fingerprint_path(self.state_file)


def fingerprint_path(state_file: Path) -> Path:
    return state_file.with_name(state_file.name + ".json")
