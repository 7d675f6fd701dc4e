"""Starting a VM: QEMU's command line, the daemonizing launch, boot and restore.

A VM is one ``qemu-system-x86_64 -daemonize`` process.  The launcher returns only
once QEMU has initialised (RAM allocated, disks opened, sockets bound), so start-up
failures surface as its exit status; the daemon then belongs to init, in its own
session, and outlives the worker that started it.  QEMU writes its pidfile and its
stderr (``-D``) into the VM's runtime directory (`VMPaths`).

A caller that checked the VM's files hands them over already open (`OpenedFiles`):
each disk as a `PinnedChain` whose ``json:`` spec names every image of its chain by
``/proc/self/fd/N`` (the drive is still ``disk{index}``), and the kernel and initrd
by descriptor too.  The descriptors reach QEMU through ``pass_fds`` and survive its
``-daemonize`` forks; QEMU reopens exactly the inodes that were checked, whatever
the names in the storage root have become since.  They are close-on-exec in the
worker, so no other child of the worker inherits them.

A restore launches QEMU with ``-incoming defer`` and hands it the state file's
descriptor over QMP (SCM_RIGHTS + ``getfd``) for ``migrate-incoming fd:``, after
`check_saved_state` has accepted the fingerprint file.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from api.protocol import hresults
from api.protocol.formats import MiB
from workers.engines.beneath import proc_path
from workers.engines.context import OperationContext, ProgressSpan
from workers.engines.qemu_img.pinned import PinnedChain
from workers.engines.qemu_vm.accel import choose_accel
from workers.engines.qemu_vm.config import (
    QEMU_SYSTEM,
    VMConfig,
    VMPaths,
    disk_format,
    fingerprint_path,
)
from workers.engines.qemu_vm.devices import cpu_argv, display_argv, network_argv, qemu_opt
from workers.engines.qemu_vm.monitor import (
    UNIX_PATH_MAX,
    Monitor,
    connect,
)
from workers.engines.qemu_vm.process import POLL_INTERVAL, cleanup, find_pid, force_stop
from workers.engines.qemu_vm.statefile import STATE_FD_NAME, check_saved_state
from workers.failures import (
    Cancelled,
    CorruptImage,
    DiskError,
    IllegalValue,
    IncompatibleSavedState,
    OperationFailed,
    OperationTimedOut,
    OutOfMemory,
    QMPCommandFailed,
    VMNotRunning,
)

START_TIMEOUT = 60.0


@dataclass(frozen=True)
class OpenedFiles:
    """A VM's files as the caller checked and opened them, for QEMU to reopen by fd."""

    drives: Sequence[PinnedChain]
    """One per disk of the config, in its order."""
    kernel: int | None = None
    initrd: int | None = None

    @property
    def fds(self) -> tuple[int, ...]:
        """Every descriptor QEMU must inherit."""
        files = tuple(fd for fd in (self.kernel, self.initrd) if fd is not None)
        return tuple(fd for chain in self.drives for fd in chain.fds) + files


def _drive_file(config: VMConfig, index: int, opened: OpenedFiles | None) -> str:
    disk = config.disks[index]
    if opened is None:
        return f"file={qemu_opt(disk)},format={disk_format(disk)}"
    # The pinned spec carries every driver, so no format= (it would clash).
    return f"file={qemu_opt(opened.drives[index].spec())}"


def build_argv(
    config: VMConfig,
    paths: VMPaths,
    accel: str,
    *,
    machine: str | None = None,
    incoming: bool = False,
    opened: OpenedFiles | None = None,
) -> list[str]:
    """QEMU's command line; with ``opened``, every file is named by descriptor."""
    if opened is not None and len(opened.drives) != len(config.disks):
        raise IllegalValue(f"{len(opened.drives)} opened drives for {len(config.disks)} disks")
    argv = [
        QEMU_SYSTEM,
        "-name", f"guest={qemu_opt(config.name)}",
        "-machine", machine or config.machine,
        "-accel", accel,
        "-m", f"{config.memory_mb}M",
        *cpu_argv(config),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-chardev", f"socket,id=qmp,path={qemu_opt(paths.qmp_socket)},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev", f"file,id=serial0,path={qemu_opt(paths.serial_log)},append=on",
        "-serial", "chardev:serial0",
        "-pidfile", str(paths.pidfile),
        "-D", str(paths.qemu_log),
        "-daemonize",
    ]  # fmt: skip
    for index in range(len(config.disks)):
        argv += [
            "-drive",
            f"{_drive_file(config, index, opened)},if={config.disk_interface},id=disk{index}",
        ]
    if config.kernel is not None:
        kernel = opened.kernel if opened is not None else None
        argv += ["-kernel", config.kernel if kernel is None else proc_path(kernel)]
    if config.initrd is not None:
        initrd = opened.initrd if opened is not None else None
        argv += ["-initrd", config.initrd if initrd is None else proc_path(initrd)]
    if config.append is not None:
        argv += ["-append", config.append]
    argv += network_argv(config)
    argv += display_argv(config)
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


# The host's heartbeat shows it (``memory_free_bytes``): an evacuation places by it.
available_memory_bytes = _available_memory_bytes


def check_host_memory(config: VMConfig) -> None:
    available = _available_memory_bytes()
    if available is not None and config.memory_mb * MiB > available:
        raise OutOfMemory(
            f"VM {config.name} needs {config.memory_mb} MB of RAM; "
            f"the host has {available // MiB} MB available"
        )


def _check_files(config: VMConfig) -> None:
    for what, path in [("Disk", d) for d in config.disks] + [
        ("Kernel", config.kernel),
        ("Initrd", config.initrd),
    ]:
        if path is not None and not os.path.isfile(path):
            raise DiskError(f"{what} {path} does not exist", hresults.FILE_NOT_FOUND)


def read_logs(paths: VMPaths) -> str:
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


def launch(argv: list[str], paths: VMPaths, context: OperationContext, deadline: float,
            pass_fds: Sequence[int] = ()) -> None:
    """Run the daemonizing launcher and wait until QEMU is initialised or has failed."""
    for stale in (paths.qemu_log, paths.qmp_socket, paths.pidfile):
        stale.unlink(missing_ok=True)
    with open(paths.launch_log, "wb") as log:
        try:
            launcher = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
                pass_fds=tuple(pass_fds),
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
        force_stop(paths)
        cleanup(paths)
        raise
    if status != 0:
        force_stop(paths)
        cleanup(paths)
        raise _start_failure(read_logs(paths), restoring="-incoming" in argv)


def start(
    config: VMConfig,
    paths: VMPaths,
    context: OperationContext,
    *,
    incoming_state: Path | None = None,
    timeout: float = START_TIMEOUT,
    opened: OpenedFiles | None = None,
) -> int:
    """Boot the VM, or restore it from ``incoming_state``; return QEMU's pid.

    ``opened``: the VM's files, checked and opened by the caller (see `OpenedFiles`);
    without it QEMU opens them by name.

    A restore checks the fingerprint file first and consumes the state file on
    success (the guest's disks move on, so the old state could never be loaded
    again safely).  On any failure no QEMU is left running and the state file stays.
    """
    deadline = time.monotonic() + timeout
    progress = ProgressSpan(context, min_step=0.5)
    progress.step(0)
    if len(os.fsencode(paths.qmp_socket)) > UNIX_PATH_MAX:
        raise IllegalValue(
            f"The VM directory is too deep for a unix socket path: {paths.qmp_socket}"
        )
    pid = find_pid(paths)
    if pid is not None:
        raise OperationFailed(f"VM {config.name} is already running (pid {pid})")
    _check_files(config)
    check_host_memory(config)
    metadata: dict[str, Any] | None = None
    if incoming_state is not None:
        context.log(f"restore from {incoming_state}")
        metadata = check_saved_state(config, Path(incoming_state), progress)
    if context.cancel_requested():
        raise Cancelled()
    accel = choose_accel(config.accel)
    context.log(f"accelerator {accel} (VMTASK_ACCEL={config.accel})")
    progress.step(20)
    paths.directory.mkdir(parents=True, exist_ok=True)
    argv = build_argv(
        config,
        paths,
        accel,
        machine=metadata["machine"] if metadata else None,
        incoming=incoming_state is not None,
        opened=opened,
    )
    context.log("launch: " + shlex.join(argv))
    launch(argv, paths, context, deadline, () if opened is None else opened.fds)
    progress.step(40)
    try:
        pid = find_pid(paths)
        if pid is None:
            raise OperationFailed(f"QEMU started but exited at once: {read_logs(paths)}")
        with connect(paths, timeout=max(1.0, deadline - time.monotonic())) as monitor:
            progress.step(50)
            if incoming_state is not None and metadata is not None:
                _incoming(monitor, Path(incoming_state), metadata, pid, context, progress, deadline)
            status = monitor.execute("query-status")["status"]
            context.log(f"QEMU pid {pid} up; QMP query-status: {status}")
            if status not in ("running", "paused"):
                raise OperationFailed(f"QEMU started in the unexpected run state {status!r}")
    except BaseException as exc:
        force_stop(paths)
        if isinstance(exc, VMNotRunning) and incoming_state is not None:
            raise IncompatibleSavedState(
                f"QEMU could not load the saved state {incoming_state}: {read_logs(paths) or exc}"
            ) from None
        if isinstance(exc, VMNotRunning):
            raise OperationFailed(
                f"QEMU exited during start-up: {read_logs(paths) or exc}"
            ) from None
        raise
    finally:
        if find_pid(paths) is None:
            cleanup(paths)
    if incoming_state is not None:
        fingerprint_path(Path(incoming_state)).unlink(missing_ok=True)
        Path(incoming_state).unlink(missing_ok=True)
    progress.step(100)
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
    progress: ProgressSpan,
    deadline: float,
) -> None:
    fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC)
    try:
        monitor.send_fd(STATE_FD_NAME, fd)
    finally:
        os.close(fd)
    try:
        monitor.execute("migrate-incoming", {"uri": f"fd:{STATE_FD_NAME}"})
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
