"""Talking to a running VM over QMP: the `Monitor` connection and the simple commands.

Each `Monitor` runs its own private event loop around `qemu.qmp.QMPClient`, so it
must not be used from inside a running asyncio loop.  The one-shot commands (pause,
resume, reset, powerdown, query_status, turn_off) and `vm_state`, which reconciles
the recorded state with what the host shows, open a connection per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Coroutine, Mapping
from types import TracebackType
from typing import Any, TypeVar

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, QMPError

from api.enums import VMVMState
from workers.engines.qemu_vm.config import VMPaths
from workers.engines.qemu_vm.process import cleanup, find_pid, force_stop, is_alive, wait_pid
from workers.failures import (
    IllegalValue,
    OperationFailed,
    OperationTimedOut,
    QMPCommandFailed,
    VMNotRunning,
)

QMP_TIMEOUT = 15.0
TURN_OFF_GRACE = 10.0
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL

T = TypeVar("T")


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

    def add_fd(self, fd: int) -> int:
        """Put a duplicate of ``fd`` into a new fd set (``add-fd``); QEMU opens it as
        ``/dev/fdset/N`` (a block node's file), and reopens it from the set later."""
        if self._client is None:
            raise VMNotRunning(f"QMP connection to {self.paths.directory.name} is closed")
        try:
            self._client.send_fd_scm(fd)
        except (OSError, QMPError) as exc:
            raise VMNotRunning(f"Could not pass a file descriptor to QEMU: {exc}") from None
        return int(self.execute("add-fd")["fdset-id"])

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
    if len(os.fsencode(paths.qmp_socket)) > UNIX_PATH_MAX:
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
        if not wait_pid(pid, paths, grace):
            force_stop(paths)
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
