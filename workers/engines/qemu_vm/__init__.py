"""VM engine: real QEMU processes driven over QMP.

This is the process/QMP layer only.  The task system wraps these functions in Celery
tasks, owns the per-VM lock and keeps the authoritative `VMVMState` in Redis; nothing
here talks to Redis or Celery.

Processes.  A VM is one ``qemu-system-x86_64 -daemonize`` process.  The launcher
returns only once QEMU has initialised (RAM allocated, disks opened, sockets bound),
so start-up failures surface as its exit status; the daemon then belongs to init, in
its own session, and outlives the worker that started it.  QEMU writes its pidfile and
its stderr (``-D``) into the VM's runtime directory (`VMPaths`).  A process counts as
"ours" only if ``/proc/<pid>/cmdline`` is a qemu-system binary started with this VM's
pidfile, so a stale pidfile or a reused pid is never mistaken for the VM.

Saved state.  QEMU 7.2 has no ``file:`` migration URI and a shell ``exec:`` URI is not
acceptable, so the state file is opened here and its descriptor handed to QEMU over
the QMP socket (SCM_RIGHTS + ``getfd``), for ``migrate fd:`` and for ``migrate-incoming
fd:``.  Beside the state file sits a JSON *fingerprint file*, written only after the
state file is complete: it holds a hash of the parts of the configuration that must be
identical on restore, the exact machine type, the run state to return to, and the size
and SHA-256 of the state file.  A restore checks it before any QEMU is launched.

All functions are synchronous; each QMP connection runs its own private event loop,
so they must not be called from inside a running asyncio loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, QMPError

from api.enums import VMVMState
from api.protocol import hresults
from workers.engines.context import OperationContext
from workers.failures import (
    Cancelled,
    CorruptImage,
    DiskError,
    IllegalValue,
    IncompatibleSavedState,
    OperationFailed,
    OperationTimedOut,
    OutOfMemory,
)

__all__ = [
    "ACCELS",
    "DISK_FORMATS",
    "AccelProbe",
    "Monitor",
    "QMPCommandFailed",
    "VMConfig",
    "VMNotRunning",
    "VMPaths",
    "build_argv",
    "choose_accel",
    "cleanup",
    "config_fingerprint",
    "connect",
    "discard_saved_state",
    "disk_format",
    "find_pid",
    "is_alive",
    "pause",
    "powerdown",
    "probe_accel",
    "query_status",
    "read_saved_state_info",
    "reset",
    "resume",
    "save",
    "start",
    "turn_off",
    "vm_state",
    "wait_for_exit",
]

QEMU_SYSTEM = "qemu-system-x86_64"

ACCELS = ("auto", "kvm", "tcg")
DISK_FORMATS: dict[str, str] = {
    ".qcow2": "qcow2",
    ".img": "raw",
    ".raw": "raw",
    ".vhd": "vpc",
    ".vhdx": "vhdx",
}
# QEMU registers a migration blocker for every node in these formats.
UNMIGRATABLE_FORMATS = frozenset({"vpc", "vhdx"})
DISK_INTERFACES = ("virtio", "ide")
MAX_IDE_DISKS = 4
MAX_MEMORY_MB = 4 * 1024 * 1024  # 4 TiB: far beyond any host, catches unit mistakes

QMP_TIMEOUT = 15.0
START_TIMEOUT = 60.0
SAVE_TIMEOUT = 1800.0
TURN_OFF_GRACE = 10.0
POLL_INTERVAL = 0.05
# The destination is a local file, so QEMU's default 32 MiB/s migration cap would
# only slow saves down; 1 TiB/s is "no limit" in practice.
UNLIMITED_BANDWIDTH = 1 << 40

STATE_FORMAT_VERSION = 1
_STATE_FD_NAME = "vmtask-state"
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL
_MIB = 1024 * 1024

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9 _.()+-]{0,63}$")
_MACHINE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")

T = TypeVar("T")


# --------------------------------------------------------------------------- errors


class VMNotRunning(OperationFailed):
    """The VM has no live QEMU process, or its QMP socket is gone."""


class QMPCommandFailed(OperationFailed):
    """QEMU answered a QMP command with an error."""

    def __init__(self, command: str, error_class: str, description: str) -> None:
        super().__init__(f"QMP {command} failed: {description}")
        self.command = command
        self.error_class = error_class
        self.qemu_description = description


# --------------------------------------------------------------------------- config


def disk_format(path: str | os.PathLike[str]) -> str:
    """QEMU's block driver for a disk image, chosen by its extension."""
    suffix = Path(path).suffix.lower()
    try:
        return DISK_FORMATS[suffix]
    except KeyError:
        known = ", ".join(sorted(DISK_FORMATS))
        raise IllegalValue(
            f"Unsupported disk format {suffix or '(none)'!r} for {path}; known: {known}"
        ) from None


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

    def __post_init__(self) -> None:
        if isinstance(self.disks, str) or isinstance(self.extra_args, str):
            raise IllegalValue("disks and extra_args must be sequences of strings, not a string")
        object.__setattr__(self, "disks", tuple(self.disks))
        object.__setattr__(self, "extra_args", tuple(self.extra_args))
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
        if self.accel not in ACCELS:
            raise IllegalValue(f"Illegal accelerator {self.accel!r}: one of {ACCELS}")
        if not isinstance(self.machine, str) or not _MACHINE_RE.match(self.machine):
            raise IllegalValue(f"Illegal machine type {self.machine!r}")

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
        for key in ("disks", "extra_args"):
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


def _fingerprint_fields(config: VMConfig) -> dict[str, Any]:
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
    }


def config_fingerprint(config: VMConfig) -> str:
    """SHA-256 over the configuration a saved state depends on."""
    canonical = json.dumps(_fingerprint_fields(config), sort_keys=True, separators=(",", ":"))
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
    def state_file(self) -> Path:
        return self.directory / "saved.state"

    @property
    def state_tmp(self) -> Path:
        return self.directory / "saved.state.tmp"

    @property
    def fingerprint_file(self) -> Path:
        return _fingerprint_path(self.state_file)


def _fingerprint_path(state_file: Path) -> Path:
    return state_file.with_name(state_file.name + ".json")


# --------------------------------------------------------------------------- progress


class _Progress:
    """Maps a phase's 0..1 onto a slice of 0..100 and never reports a decrease."""

    # Finer steps would only be dropped by the runtime's rate limit.
    MIN_STEP = 0.5

    def __init__(self, context: OperationContext) -> None:
        self._context = context
        self._last = -1.0

    def report(self, percent: float) -> None:
        percent = max(0.0, min(100.0, percent))
        if percent >= self._last + self.MIN_STEP or (percent == 100.0 and self._last < 100.0):
            self._last = percent
            self._context.report_progress(percent)

    def span(self, low: float, high: float, fraction: float) -> None:
        self.report(low + (high - low) * max(0.0, min(1.0, fraction)))


# --------------------------------------------------------------------------- accel probe

# A 64 KiB BIOS image that replaces SeaBIOS for the probe: the reset vector jumps to a
# real-mode loop of _PROBE_OUTER x _PROBE_INNER `dec ecx; jnz` iterations, with one
# port write (a VM exit) per outer round, then writes to isa-debug-exit, which makes
# QEMU exit with status 1.  No firmware, no devices: the run time is QEMU's start-up
# plus the guest's instruction rate, which is what "KVM runs at speed" means.
_PROBE_OUTER = 200
_PROBE_INNER = 400_000
_PROBE_EXIT_STATUS = 1
_PROBE_TCG_TIMEOUT = 1.0
_PROBE_LOOP = bytes(
    [
        0x66, 0x49,  # inner: dec ecx
        0x75, 0xFC,  # jnz inner
        0xE6, 0x80,  # out 0x80, al          (a VM exit under KVM)
        0x4B,        # dec bx
        0x75, 0xF1,  # jnz outer
        0xB0, 0x00,  # mov al, 0
        0xE6, 0xF4,  # out 0xf4, al          (isa-debug-exit: QEMU exits with 1)
        0xF4,        # hlt
        0xEB, 0xFD,  # jmp hlt
    ]
)  # fmt: skip


def _probe_rom(outer: int = _PROBE_OUTER, inner: int = _PROBE_INNER) -> bytes:
    code = b"\xbb" + struct.pack("<H", outer)  # mov bx, outer
    code += b"\x66\xb9" + struct.pack("<I", inner)  # outer: mov ecx, inner
    code += _PROBE_LOOP
    image = bytearray(0x10000)
    image[: len(code)] = code
    # Reset vector (F000:FFF0): far jump to F000:0000, the start of the image.
    image[0xFFF0:0xFFF5] = b"\xea\x00\x00\x00\xf0"
    return bytes(image)


@dataclass(frozen=True)
class AccelProbe:
    """The verdict of `probe_accel` and the wall times it was based on."""

    verdict: str
    tcg_seconds: float | None
    kvm_seconds: float | None  # None: unusable, failed, or slower than TCG (cut off)
    detail: str


_accel_cache: dict[tuple[str, str], AccelProbe] = {}
_accel_lock = threading.Lock()


def _kvm_usable() -> bool:
    return os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)


def _time_probe(rom: Path, accel: str, timeout: float) -> float | None:
    argv = [
        QEMU_SYSTEM, "-accel", accel, "-machine", "pc", "-m", "16", "-nodefaults",
        "-no-user-config", "-display", "none", "-bios", str(rom),
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]  # fmt: skip
    began = time.monotonic()
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
    except (subprocess.TimeoutExpired, OSError):
        return None
    elapsed = time.monotonic() - began
    return elapsed if done.returncode == _PROBE_EXIT_STATUS else None


def _run_probe() -> AccelProbe:
    """Time the same small guest workload under TCG and under KVM (< ~1 s).

    KVM wins only if it finishes sooner than TCG did: a real KVM runs the loop at
    native speed, while an emulated or badly nested one is orders of magnitude slower
    and is cut off at TCG's time, so the probe never waits longer than TCG took.
    """
    if not _kvm_usable():
        return AccelProbe("tcg", None, None, "/dev/kvm is missing or not accessible")
    with tempfile.TemporaryDirectory(prefix="vmtask-accel-") as tmp:
        rom = Path(tmp) / "probe.rom"
        rom.write_bytes(_probe_rom())
        tcg = _time_probe(rom, "tcg", _PROBE_TCG_TIMEOUT)
        kvm = _time_probe(rom, "kvm", tcg if tcg is not None else _PROBE_TCG_TIMEOUT)
    if kvm is not None and (tcg is None or kvm < tcg):
        return AccelProbe("kvm", tcg, kvm, "KVM ran the probe faster than TCG")
    if kvm is None:
        detail = "KVM did not finish the probe within TCG's time"
    else:
        detail = "KVM was slower than TCG"
    return AccelProbe("tcg", tcg, kvm, detail)


def probe_accel(*, refresh: bool = False) -> AccelProbe:
    """The accelerator probe's result, run once per process and host unless ``refresh``."""
    key = (socket.gethostname(), shutil.which(QEMU_SYSTEM) or QEMU_SYSTEM)
    # Held during the probe, so concurrent first callers wait for one probe.
    with _accel_lock:
        probe = _accel_cache.get(key)
        if probe is None or refresh:
            probe = _accel_cache[key] = _run_probe()
        return probe


def choose_accel(setting: str = "auto") -> str:
    """``"kvm"`` or ``"tcg"``; ``"auto"`` picks KVM only if `probe_accel` found it fast."""
    if setting == "tcg":
        return "tcg"
    if setting == "kvm":
        if not _kvm_usable():
            raise IllegalValue("The KVM accelerator was requested but /dev/kvm is not usable")
        return "kvm"
    if setting != "auto":
        raise IllegalValue(f"Illegal accelerator {setting!r}: one of {ACCELS}")
    return probe_accel().verdict


# --------------------------------------------------------------------------- processes


def _read_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The state letter follows the last ')' (the command name may contain one).
    if stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] in ("Z", "X"):
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]]


def _is_our_qemu(pid: int, paths: VMPaths) -> bool:
    argv = _read_cmdline(pid)
    if not argv or not os.path.basename(argv[0]).startswith("qemu-system"):
        return False
    try:
        pidfile = argv[argv.index("-pidfile") + 1]
    except (ValueError, IndexError):
        return False
    return os.path.realpath(pidfile) == os.path.realpath(paths.pidfile)


def find_pid(paths: VMPaths) -> int | None:
    """The pid of this VM's live QEMU, or None.

    The pidfile is the fast path; /proc is scanned as well because QEMU's pidfile can
    be deleted behind its back, and a VM must never be reported dead while it runs.
    """
    with contextlib.suppress(OSError, ValueError):
        pid = int(paths.pidfile.read_text().strip())
        if pid > 0 and _is_our_qemu(pid, paths):
            return pid
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and _is_our_qemu(int(entry.name), paths):
            return int(entry.name)
    return None


def is_alive(paths: VMPaths) -> bool:
    return find_pid(paths) is not None


def _wait_pid(pid: int, paths: VMPaths, timeout: float) -> bool:
    """True once ``pid`` is gone (or is no longer this VM's QEMU)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:
        return _wait_until(lambda: not _is_our_qemu(pid, paths), timeout)
    try:
        # Re-check after opening: the pid may have been reused in between.
        if not _is_our_qemu(pid, paths):
            return True
        readable, _, _ = select.select([pidfd], [], [], max(0.0, timeout))
        return bool(readable) or not _is_our_qemu(pid, paths)
    finally:
        os.close(pidfd)


def wait_for_exit(paths: VMPaths, timeout: float) -> bool:
    """Wait until the VM's QEMU has exited; True if it did within ``timeout`` seconds."""
    pid = find_pid(paths)
    return True if pid is None else _wait_pid(pid, paths, timeout)


def _kill(pid: int, paths: VMPaths) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        # Signal through the pidfd, after the identity check, so a reused pid is
        # never hit.
        if _is_our_qemu(pid, paths):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)


def _force_stop(paths: VMPaths, timeout: float = 10.0) -> None:
    """SIGKILL whatever QEMU this VM has and wait for it; used on failure paths."""
    deadline = time.monotonic() + timeout
    while (pid := find_pid(paths)) is not None:
        if time.monotonic() > deadline:
            raise OperationFailed(f"QEMU process {pid} of {paths.directory.name} does not die")
        _kill(pid, paths)
        _wait_pid(pid, paths, max(0.0, deadline - time.monotonic()))


def _wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(interval, remaining))


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def cleanup(paths: VMPaths) -> None:
    """Remove the socket, pidfile and partial save of a VM that is not running.

    Logs and a completed saved state stay.  Refuses (OperationFailed) while QEMU runs.
    """
    pid = find_pid(paths)
    if pid is not None:
        raise OperationFailed(f"VM {paths.directory.name} is still running (pid {pid})")
    for path in (
        paths.qmp_socket,
        paths.pidfile,
        paths.state_tmp,
        _fingerprint_path(paths.state_tmp),
    ):
        _unlink(path)


def discard_saved_state(paths: VMPaths) -> None:
    """Delete a saved state and its fingerprint file (the VM becomes Turned Off)."""
    for path in (paths.state_file, paths.fingerprint_file, paths.state_tmp):
        _unlink(path)


# --------------------------------------------------------------------------- QMP


class Monitor:
    """A synchronous QMP connection to one VM, over `qemu.qmp.QMPClient`.

    QEMU's monitor serves one client at a time; a second connection waits for the
    greeting until the first closes, hence the connect timeout.
    """

    def __init__(self, paths: VMPaths, *, timeout: float = QMP_TIMEOUT) -> None:
        self.paths = paths
        self._loop = asyncio.new_event_loop()
        self._client: QMPClient | None = None
        try:
            self._client = self._run(self._make_client(), timeout)
            self._run(self._connect(self._client), timeout)
        except BaseException as exc:
            self.close()
            if isinstance(exc, TimeoutError):
                raise OperationTimedOut(
                    f"QEMU of {paths.directory.name} did not answer on QMP within {timeout:g} s"
                ) from None
            if isinstance(exc, ConnectError | OSError | EOFError | QMPError):
                raise VMNotRunning(
                    f"VM {paths.directory.name} is not running (no QMP: {exc})"
                ) from None
            raise

    async def _make_client(self) -> QMPClient:
        # Built inside the loop so its asyncio primitives belong to it.
        client = QMPClient(self.paths.directory.name)
        # qemu.qmp 0.0.6 negotiates by reading one message and asserting it is the
        # reply, but QEMU can emit an event between switching the session to command
        # mode and sending that reply.  Negotiating through execute() instead lets the
        # running reader file such events away and match the reply by its id.
        client.negotiate = False
        return client

    async def _connect(self, client: QMPClient) -> None:
        await client.connect(str(self.paths.qmp_socket))
        await client.execute("qmp_capabilities")

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        *,
        timeout: float = QMP_TIMEOUT,
    ) -> Any:
        if self._client is None:
            raise VMNotRunning(f"QMP connection to {self.paths.directory.name} is closed")
        try:
            return self._run(self._client.execute(command, arguments), timeout)
        except ExecuteError as exc:
            raise QMPCommandFailed(command, exc.error_class, str(exc)) from None
        except TimeoutError:
            raise OperationTimedOut(f"QMP {command} did not answer within {timeout:g} s") from None
        except (ExecInterruptedError, EOFError, ConnectionError, QMPError) as exc:
            raise VMNotRunning(
                f"QEMU of {self.paths.directory.name} hung up during {command}: {exc}"
            ) from None

    def send_fd(self, name: str, fd: int) -> None:
        """Give QEMU a duplicate of ``fd`` under ``name`` (SCM_RIGHTS + ``getfd``)."""
        if self._client is None:
            raise VMNotRunning(f"QMP connection to {self.paths.directory.name} is closed")
        try:
            self._client.send_fd_scm(fd)
        except (OSError, QMPError) as exc:
            raise VMNotRunning(f"Could not pass a file descriptor to QEMU: {exc}") from None
        self.execute("getfd", {"fdname": name})

    def close(self) -> None:
        if self._client is not None:
            # Disconnect re-raises whatever ended the session (EOF after quit): moot here.
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(asyncio.wait_for(self._client.disconnect(), 5.0))
            self._client = None
        if not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def connect(paths: VMPaths, *, timeout: float = QMP_TIMEOUT) -> Monitor:
    """Open a QMP connection to a running VM; use it as a context manager."""
    if len(os.fsencode(paths.qmp_socket)) > _UNIX_PATH_MAX:
        raise IllegalValue(f"QMP socket path is too long for a unix socket: {paths.qmp_socket}")
    if not paths.qmp_socket.exists():
        # QEMU removes its socket on exit: no need to try (and have qemu.qmp log an error).
        raise VMNotRunning(f"VM {paths.directory.name} is not running (no QMP socket)")
    return Monitor(paths, timeout=timeout)


def _command(paths: VMPaths, command: str) -> None:
    with connect(paths) as monitor:
        monitor.execute(command)


def pause(paths: VMPaths) -> None:
    _command(paths, "stop")


def resume(paths: VMPaths) -> None:
    _command(paths, "cont")


def reset(paths: VMPaths) -> None:
    _command(paths, "system_reset")


def powerdown(paths: VMPaths) -> None:
    """Press the ACPI power button; the guest decides whether to shut down."""
    _command(paths, "system_powerdown")


def query_status(paths: VMPaths) -> str:
    """QEMU's run state: "running", "paused", "inmigrate", "postmigrate", ..."""
    with connect(paths) as monitor:
        return str(monitor.execute("query-status")["status"])


def turn_off(paths: VMPaths, *, grace: float = TURN_OFF_GRACE) -> None:
    """Pull the plug: QMP ``quit``, then SIGKILL if QEMU is still there after ``grace``."""
    pid = find_pid(paths)
    if pid is not None:
        with (
            contextlib.suppress(OperationFailed),
            connect(paths, timeout=min(grace, QMP_TIMEOUT)) as monitor,
        ):
            monitor.execute("quit", timeout=grace)
        if not _wait_pid(pid, paths, grace):
            _force_stop(paths)
    cleanup(paths)


_QEMU_TO_VMSTATE: dict[str, VMVMState] = {
    "running": VMVMState.Running,
    "paused": VMVMState.Paused,
    "suspended": VMVMState.Paused,
    "debug": VMVMState.Paused,
    "prelaunch": VMVMState.TurningOn,
    "inmigrate": VMVMState.Restoring,
    "restore-vm": VMVMState.Restoring,
    "finish-migrate": VMVMState.Saving,
    "postmigrate": VMVMState.Saving,
    "save-vm": VMVMState.Saving,
    "shutdown": VMVMState.TurningOff,
}


def vm_state(paths: VMPaths) -> VMVMState:
    """What the host really shows, for reconciling the recorded state after a restart.

    No process: Saved if a complete saved state exists, else TurnedOff.  A process
    whose monitor cannot be reached or whose run state has no counterpart (internal
    error, guest panic, ...) is Invalid.
    """
    if not is_alive(paths):
        complete = paths.state_file.exists() and paths.fingerprint_file.exists()
        return VMVMState.Saved if complete else VMVMState.TurnedOff
    try:
        status = query_status(paths)
    except VMNotRunning:
        return VMVMState.Saved if paths.state_file.exists() else VMVMState.TurnedOff
    except OperationFailed:
        return VMVMState.Invalid
    return _QEMU_TO_VMSTATE.get(status, VMVMState.Invalid)


# --------------------------------------------------------------------------- start


def _qemu_opt(value: str | os.PathLike[str]) -> str:
    # QemuOpts splits on commas; a literal comma is written twice.
    return os.fspath(value).replace(",", ",,")


def build_argv(
    config: VMConfig,
    paths: VMPaths,
    accel: str,
    *,
    machine: str | None = None,
    incoming: bool = False,
) -> list[str]:
    argv = [
        QEMU_SYSTEM,
        "-name", f"guest={_qemu_opt(config.name)}",
        "-machine", machine or config.machine,
        "-accel", accel,
        "-m", f"{config.memory_mb}M",
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-chardev", f"socket,id=qmp,path={_qemu_opt(paths.qmp_socket)},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev", f"file,id=serial0,path={_qemu_opt(paths.serial_log)},append=on",
        "-serial", "chardev:serial0",
        "-pidfile", str(paths.pidfile),
        "-D", str(paths.qemu_log),
        "-daemonize",
    ]  # fmt: skip
    for index, disk in enumerate(config.disks):
        argv += [
            "-drive",
            f"file={_qemu_opt(disk)},format={disk_format(disk)},if={config.disk_interface},id=disk{index}",
        ]
    if config.kernel is not None:
        argv += ["-kernel", config.kernel]
    if config.initrd is not None:
        argv += ["-initrd", config.initrd]
    if config.append is not None:
        argv += ["-append", config.append]
    argv += list(config.extra_args)
    if incoming:
        argv += ["-incoming", "defer"]
    return argv


def _available_memory_bytes() -> int | None:
    """Memory a new VM can really get: MemAvailable, capped by a cgroup v2 limit."""
    available: int | None = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    with contextlib.suppress(OSError, ValueError):
        cgroup = Path("/proc/self/cgroup").read_text().splitlines()
        unified = next((line[3:] for line in cgroup if line.startswith("0::")), None)
        if unified is not None:
            base = Path("/sys/fs/cgroup") / unified.lstrip("/")
            limit = (base / "memory.max").read_text().strip()
            if limit != "max":
                headroom = int(limit) - int((base / "memory.current").read_text())
                available = headroom if available is None else min(available, headroom)
    return available


def _check_host_memory(config: VMConfig) -> None:
    available = _available_memory_bytes()
    if available is not None and config.memory_mb * _MIB > available:
        raise OutOfMemory(
            f"VM {config.name} needs {config.memory_mb} MB of RAM; "
            f"the host has {available // _MIB} MB available"
        )


def _check_files(config: VMConfig) -> None:
    for what, path in [("Disk", d) for d in config.disks] + [
        ("Kernel", config.kernel),
        ("Initrd", config.initrd),
    ]:
        if path is not None and not os.path.isfile(path):
            raise DiskError(f"{what} {path} does not exist", hresults.FILE_NOT_FOUND)


def _read_logs(paths: VMPaths) -> str:
    parts = []
    for log in (paths.launch_log, paths.qemu_log):
        with contextlib.suppress(OSError):
            text = log.read_text(errors="replace").strip()
            if text:
                parts.append(text[-4000:])
    return "\n".join(parts)


_OOM_MARKERS = (
    "cannot set up guest memory",
    "cannot allocate memory",
    "os_mem_prealloc",
    "preallocate",
    "out of memory",
)


def _start_failure(text: str, *, restoring: bool) -> OperationFailed:
    """Classify QEMU's complaint about a failed start (its stderr, lower-cased)."""
    lowered = text.lower()
    message = f"QEMU failed to start: {text or '(no output)'}"
    if any(marker in lowered for marker in _OOM_MARKERS):
        return OutOfMemory(message)
    if "cannot lock pid file" in lowered:
        return OperationFailed(f"The VM is already running: {text}")
    if "no such file or directory" in lowered and "could not open" in lowered:
        return DiskError(message, hresults.FILE_NOT_FOUND)
    if 'failed to get "write" lock' in lowered or "permission denied" in lowered:
        return DiskError(message, hresults.ACCESS_DENIED)
    if (
        "image is corrupt" in lowered
        or "not in qcow2 format" in lowered
        or "could not read image" in lowered
    ):
        return CorruptImage(message)
    if restoring and "unsupported machine type" in lowered:
        return IncompatibleSavedState(
            f"The saved state needs a machine type this QEMU lacks: {text}"
        )
    return OperationFailed(message)


def _launch(argv: list[str], paths: VMPaths, context: OperationContext, deadline: float) -> None:
    """Run the daemonizing launcher and wait until QEMU is initialised or has failed."""
    for stale in (paths.qemu_log, paths.qmp_socket, paths.pidfile):
        _unlink(stale)
    with open(paths.launch_log, "wb") as log:
        try:
            launcher = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
            )
        except FileNotFoundError:
            raise OperationFailed(f"{QEMU_SYSTEM} is not installed") from None
    try:
        while True:
            try:
                status = launcher.wait(timeout=POLL_INTERVAL)
                break
            except subprocess.TimeoutExpired:
                pass
            if context.cancel_requested():
                raise Cancelled()
            if time.monotonic() > deadline:
                raise OperationTimedOut(
                    f"QEMU did not finish initialising {paths.directory.name} in time"
                )
    except BaseException:
        launcher.kill()
        launcher.wait()
        _force_stop(paths)
        cleanup(paths)
        raise
    if status != 0:
        _force_stop(paths)
        cleanup(paths)
        raise _start_failure(_read_logs(paths), restoring="-incoming" in argv)


def start(
    config: VMConfig,
    paths: VMPaths,
    context: OperationContext,
    *,
    incoming_state: Path | None = None,
    timeout: float = START_TIMEOUT,
) -> int:
    """Boot the VM, or restore it from ``incoming_state``; return QEMU's pid.

    A restore checks the fingerprint file first and consumes the state file on
    success (the guest's disks move on, so the old state could never be loaded
    again safely).  On any failure no QEMU is left running and the state file stays.
    """
    deadline = time.monotonic() + timeout
    progress = _Progress(context)
    progress.report(0)
    if len(os.fsencode(paths.qmp_socket)) > _UNIX_PATH_MAX:
        raise IllegalValue(
            f"The VM directory is too deep for a unix socket path: {paths.qmp_socket}"
        )
    pid = find_pid(paths)
    if pid is not None:
        raise OperationFailed(f"VM {config.name} is already running (pid {pid})")
    _check_files(config)
    _check_host_memory(config)
    metadata: dict[str, Any] | None = None
    if incoming_state is not None:
        metadata = _check_saved_state(config, Path(incoming_state), progress)
    if context.cancel_requested():
        raise Cancelled()
    accel = choose_accel(config.accel)
    progress.report(20)
    paths.directory.mkdir(parents=True, exist_ok=True)
    argv = build_argv(
        config,
        paths,
        accel,
        machine=metadata["machine"] if metadata else None,
        incoming=incoming_state is not None,
    )
    _launch(argv, paths, context, deadline)
    progress.report(40)
    try:
        pid = find_pid(paths)
        if pid is None:
            raise OperationFailed(f"QEMU started but exited at once: {_read_logs(paths)}")
        with connect(paths, timeout=max(1.0, deadline - time.monotonic())) as monitor:
            progress.report(50)
            if incoming_state is not None and metadata is not None:
                _incoming(monitor, Path(incoming_state), metadata, pid, context, progress, deadline)
            status = monitor.execute("query-status")["status"]
            if status not in ("running", "paused"):
                raise OperationFailed(f"QEMU started in the unexpected run state {status!r}")
    except BaseException as exc:
        _force_stop(paths)
        if isinstance(exc, VMNotRunning) and incoming_state is not None:
            raise IncompatibleSavedState(
                f"QEMU could not load the saved state {incoming_state}: {_read_logs(paths) or exc}"
            ) from None
        if isinstance(exc, VMNotRunning):
            raise OperationFailed(
                f"QEMU exited during start-up: {_read_logs(paths) or exc}"
            ) from None
        raise
    finally:
        if find_pid(paths) is None:
            cleanup(paths)
    if incoming_state is not None:
        _unlink(_fingerprint_path(Path(incoming_state)))
        _unlink(Path(incoming_state))
    progress.report(100)
    return pid


def _fd_position(pid: int, target: Path) -> int | None:
    """Where QEMU's descriptor of ``target`` is: how far a load has read."""
    wanted = os.path.realpath(target)
    with contextlib.suppress(OSError):
        for entry in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(entry.path) == wanted:
                    for line in Path(f"/proc/{pid}/fdinfo/{entry.name}").read_text().splitlines():
                        if line.startswith("pos:"):
                            return int(line.split()[1])
    return None


def _incoming(
    monitor: Monitor,
    state: Path,
    metadata: Mapping[str, Any],
    pid: int,
    context: OperationContext,
    progress: _Progress,
    deadline: float,
) -> None:
    fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC)
    try:
        monitor.send_fd(_STATE_FD_NAME, fd)
    finally:
        os.close(fd)
    try:
        monitor.execute("migrate-incoming", {"uri": f"fd:{_STATE_FD_NAME}"})
    except QMPCommandFailed as exc:
        raise IncompatibleSavedState(
            f"QEMU refused the saved state: {exc.qemu_description}"
        ) from None
    size = max(1, int(metadata["state_size"]))
    while True:
        status = monitor.execute("query-status")["status"]
        if status != "inmigrate":
            break
        migration = monitor.execute("query-migrate")
        if migration.get("status") == "failed":
            detail = migration.get("error-desc", "unknown error")
            raise IncompatibleSavedState(f"QEMU could not load the saved state: {detail}")
        position = _fd_position(pid, state)
        if position is not None:
            progress.span(50, 95, position / size)
        if context.cancel_requested():
            raise Cancelled()
        if time.monotonic() > deadline:
            raise OperationTimedOut(f"Loading the saved state {state} took too long")
        time.sleep(POLL_INTERVAL)
    if metadata["run_state"] == "running" and status != "running":
        monitor.execute("cont")


# --------------------------------------------------------------------------- saved state


def _sha256(path: Path, on_progress: Callable[[float], None] | None = None) -> tuple[int, str]:
    digest = hashlib.sha256()
    total = max(1, path.stat().st_size)
    done = 0
    with open(path, "rb") as stream:
        while chunk := stream.read(4 * _MIB):
            digest.update(chunk)
            done += len(chunk)
            if on_progress is not None:
                on_progress(done / total)
    return done, digest.hexdigest()


def read_saved_state_info(state_file: Path) -> dict[str, Any]:
    """The fingerprint file of a saved state; IncompatibleSavedState if unusable."""
    meta_path = _fingerprint_path(state_file)
    if not state_file.is_file():
        raise IncompatibleSavedState(f"There is no saved state at {state_file}")
    try:
        metadata = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise IncompatibleSavedState(
            f"The saved state {state_file} has no fingerprint file"
        ) from None
    except (OSError, ValueError) as exc:
        raise IncompatibleSavedState(
            f"The fingerprint file {meta_path} is unreadable: {exc}"
        ) from None
    required = {
        "version",
        "fingerprint",
        "config",
        "machine",
        "run_state",
        "state_size",
        "state_sha256",
    }
    if not isinstance(metadata, dict) or not required <= set(metadata):
        raise IncompatibleSavedState(f"The fingerprint file {meta_path} is incomplete")
    if metadata["version"] != STATE_FORMAT_VERSION:
        raise IncompatibleSavedState(
            f"The saved state {state_file} has format version {metadata['version']}"
        )
    return metadata


def _describe_mismatch(saved: Mapping[str, Any], config: VMConfig) -> str:
    try:
        before = _fingerprint_fields(VMConfig.from_dict(saved))
    except OperationFailed:
        return "the saved configuration is unreadable"
    after = _fingerprint_fields(config)
    changes = [
        f"{key} was {before[key]!r}, is now {after[key]!r}"
        for key in sorted(after)
        if before.get(key) != after[key]
    ]
    return "; ".join(changes) or "the configuration changed"


def _check_saved_state(config: VMConfig, state: Path, progress: _Progress) -> dict[str, Any]:
    metadata = read_saved_state_info(state)
    if metadata["fingerprint"] != config_fingerprint(config):
        raise IncompatibleSavedState(
            f"The saved state of {config.name} belongs to another configuration: "
            f"{_describe_mismatch(metadata['config'], config)}"
        )
    size = state.stat().st_size
    if size != metadata["state_size"]:
        raise IncompatibleSavedState(
            f"The saved state {state} is {size} bytes, but {metadata['state_size']} "
            "were written: it is damaged"
        )
    _, digest = _sha256(state, lambda fraction: progress.span(2, 18, fraction))
    if digest != metadata["state_sha256"]:
        raise IncompatibleSavedState(f"The saved state {state} is corrupt (checksum mismatch)")
    return metadata


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, path)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cancel_migration(monitor: Monitor, deadline: float) -> str | None:
    """Cancel a migration and return its final status ("completed" if it won the race)."""
    monitor.execute("migrate_cancel")
    # QEMU only lets go of the VM once the migration has really stopped.
    while (status := monitor.execute("query-migrate").get("status")) not in (
        "cancelled",
        "failed",
        "completed",
        None,
    ):
        if time.monotonic() > deadline:
            raise OperationTimedOut("The migration did not stop after migrate_cancel")
        time.sleep(POLL_INTERVAL / 5)
    return str(status) if status is not None else None


def save(
    config: VMConfig,
    paths: VMPaths,
    context: OperationContext,
    *,
    max_bandwidth: int | None = None,
    timeout: float = SAVE_TIMEOUT,
) -> None:
    """Save the running (or paused) VM to ``paths.state_file`` and stop its QEMU.

    Progress is the fraction of guest RAM processed.  Cancelling (or a failure before
    the state is complete) cancels the migration, lets the VM run on as before and
    leaves no state file.  ``max_bandwidth`` (bytes/s) limits the write rate.
    """
    deadline = time.monotonic() + timeout
    progress = _Progress(context)
    progress.report(0)
    blocked = [disk for disk in config.disks if disk_format(disk) in UNMIGRATABLE_FORMATS]
    if blocked:
        raise IllegalValue(
            f"VM {config.name} cannot be saved: QEMU cannot save a VM with a VHD/VHDX disk "
            f"attached (migration blocker): {', '.join(blocked)}"
        )
    if context.cancel_requested():
        raise Cancelled()
    pid = find_pid(paths)
    if pid is None:
        raise VMNotRunning(f"VM {config.name} is not running")
    with connect(paths) as monitor:
        status = monitor.execute("query-status")["status"]
        if status not in ("running", "paused"):
            raise OperationFailed(f"VM {config.name} cannot be saved in the run state {status!r}")
        blockers = monitor.execute("query-migrate").get("blocked-reasons") or []
        if blockers:
            raise IllegalValue(f"VM {config.name} cannot be saved: {'; '.join(blockers)}")
        machine_type = str(monitor.execute("qom-get", {"path": "/machine", "property": "type"}))
        version = monitor.execute("query-version")["qemu"]
        monitor.execute(
            "migrate-set-parameters",
            {"max-bandwidth": max_bandwidth if max_bandwidth is not None else UNLIMITED_BANDWIDTH},
        )
        progress.report(2)
        _unlink(paths.state_tmp)
        fd = os.open(paths.state_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        completed = False
        try:
            if status == "running":
                monitor.execute("stop")
            try:
                monitor.send_fd(_STATE_FD_NAME, fd)
                monitor.execute("migrate", {"uri": f"fd:{_STATE_FD_NAME}"})
                _follow_migration(monitor, context, progress, deadline)
                os.fsync(fd)
            except BaseException:
                with contextlib.suppress(OperationFailed):
                    _cancel_migration(monitor, time.monotonic() + 30)
                if status == "running":
                    # `cont` also takes the disks back if the migration had completed.
                    monitor.execute("cont")
                raise
            completed = True
        finally:
            os.close(fd)
            if not completed:
                _unlink(paths.state_tmp)
        progress.report(96)
        try:
            size, digest = _sha256(paths.state_tmp)
            os.replace(paths.state_tmp, paths.state_file)
            metadata = {
                "version": STATE_FORMAT_VERSION,
                "fingerprint": config_fingerprint(config),
                "config": config.to_dict(),
                "machine": machine_type.removesuffix("-machine"),
                "qemu_version": f"{version['major']}.{version['minor']}.{version['micro']}",
                "run_state": status,
                "state_size": size,
                "state_sha256": digest,
                "saved_at": datetime.now(UTC).isoformat(),
            }
            _write_atomically(paths.fingerprint_file, json.dumps(metadata, indent=2).encode())
            _fsync_directory(paths.directory)
        except BaseException:
            # Without a complete state the VM must keep running, as if never saved.
            discard_saved_state(paths)
            with contextlib.suppress(OperationFailed):
                if status == "running":
                    monitor.execute("cont")
            raise
        progress.report(98)
        # The state is durable: from here the VM is Saved and its process must go.
        with contextlib.suppress(OperationFailed):
            monitor.execute("quit")
    if not _wait_pid(pid, paths, TURN_OFF_GRACE):
        _force_stop(paths)
    cleanup(paths)
    progress.report(100)


def _follow_migration(
    monitor: Monitor, context: OperationContext, progress: _Progress, deadline: float
) -> None:
    while True:
        info = monitor.execute("query-migrate")
        state = info.get("status")
        ram = info.get("ram") or {}
        if ram.get("total"):
            progress.span(5, 95, 1 - ram.get("remaining", 0) / ram["total"])
        if state == "completed":
            return
        if state in ("failed", "cancelled"):
            detail = info.get("error-desc", state)
            if "no space left" in detail.lower():
                raise DiskError(f"Saving the VM state failed: {detail}", hresults.DISK_FULL)
            raise OperationFailed(f"Saving the VM state failed: {detail}")
        if context.cancel_requested():
            # A cancel that arrives once the state is complete is too late to honour.
            if _cancel_migration(monitor, time.monotonic() + 30) == "completed":
                return
            raise Cancelled()
        if time.monotonic() > deadline:
            raise OperationTimedOut("Saving the VM state took too long")
        time.sleep(POLL_INTERVAL)
