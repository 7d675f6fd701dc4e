"""A client for the QEMU guest agent, and the QEMU arguments that wire one up.

The agent speaks JSON over a virtio-serial port; QEMU exposes the host end as a
unix socket (`qemu_guest_agent_args`).  That stream has no framing guarantees: a
reply from an earlier, abandoned command may still be in flight, and a guest
agent that restarted may hold half a command.  So every command is preceded by
``guest-sync-delimited``, as the protocol recommends: a 0xFF byte flushes the
agent's parser, and the 0xFF the agent puts before its reply marks where the
fresh part of the stream starts.
"""

from __future__ import annotations

import base64
import errno
import itertools
import json
import os
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

from workers.failures import GuestAgentError, IllegalValue, OperationTimedOut

ShutdownMode = Literal["powerdown", "reboot", "halt"]
_T = TypeVar("_T")

DEFAULT_TIMEOUT = 5.0
# How long `shutdown` waits to learn whether the guest refused: qemu-ga replies only
# once its /sbin/shutdown has exited, which a real one does at once.
REFUSAL_WAIT = 5.0
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
_EXEC_POLL = 0.05
_SENTINEL = b"\xff"
# The virtio-serial port name qemu-ga (and the tiny test guest) listen on.
AGENT_PORT_NAME = "org.qemu.guest_agent.0"
_CHARDEV_ID = "vmtask-qga0"
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
_RETRYABLE_CONNECT = {errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN}


@dataclass(frozen=True)
class ExecResult:
    """How a program run in the guest by `GuestAgentClient.run` ended."""

    exit_code: int
    stdout: bytes
    stderr: bytes


def qemu_guest_agent_args(socket_path: Path) -> list[str]:
    """The QEMU arguments for a virtio-serial agent port served on `socket_path`.

    The socket is a server that doesn't wait, so QEMU starts without a client and
    a client can come and go.
    """
    encoded = os.fsencode(socket_path)
    if len(encoded) > _MAX_SOCKET_PATH:
        raise IllegalValue(f"socket path is longer than {_MAX_SOCKET_PATH} bytes: {socket_path}")
    # QEMU's option syntax reads a comma as a separator unless it is doubled.
    path = str(socket_path).replace(",", ",,")
    return [
        "-device",
        "virtio-serial-pci,id=vmtask-vser0",
        "-chardev",
        f"socket,path={path},server=on,wait=off,id={_CHARDEV_ID}",
        "-device",
        f"virtserialport,bus=vmtask-vser0.0,chardev={_CHARDEV_ID},name={AGENT_PORT_NAME}",
    ]


class GuestAgentClient:
    """One connection to a guest agent; not thread-safe.

    Connects lazily and reconnects after a failure, since a timed-out command
    leaves the stream in an unknown state.  Every call takes its own timeout in
    seconds and raises `OperationTimedOut` when the guest doesn't answer in time
    (including when the socket doesn't exist yet because QEMU is still starting).
    """

    def __init__(self, socket_path: Path | str) -> None:
        self.socket_path = Path(socket_path)
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._ids = itertools.count(random.randrange(1, 2**31))

    def __enter__(self) -> GuestAgentClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffer = b""

    def sync(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Resynchronise the stream; on return the agent is alive and in step."""
        deadline = time.monotonic() + timeout
        self._guarded(lambda: self._sync(deadline), "guest-sync-delimited")

    def ping(self, timeout: float = DEFAULT_TIMEOUT) -> bool:
        """True when the agent answers ``guest-ping``, False when it refuses it."""
        try:
            self.execute("guest-ping", timeout=timeout)
        except GuestAgentError as exc:
            if not exc.error_class:
                raise
            return False
        return True

    def info(self, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        result = self.execute("guest-info", timeout=timeout)
        if not isinstance(result, dict):
            raise GuestAgentError(f"guest-info returned {result!r}")
        return result

    def shutdown(self, mode: ShutdownMode = "powerdown", timeout: float = DEFAULT_TIMEOUT) -> None:
        """Ask the guest to power down, reboot or halt.

        Returns once the request is delivered to an agent that was in step and did
        not refuse it; raises `GuestAgentError` with the agent's text when it did
        (qemu-ga answers with an error when the guest's shutdown program fails).
        qemu-ga sends no reply when it succeeds, and a real guest goes down behind
        the request, its agent answering on for a while: so returning says nothing
        about the outcome, which the caller learns from the VM itself (QEMU exits,
        or the guest's boot id changes).
        """
        if mode not in ("powerdown", "reboot", "halt"):
            raise IllegalValue(f"unknown shutdown mode {mode!r}")
        deadline = time.monotonic() + timeout

        def deliver() -> None:
            self._sync(deadline)
            self._send({"execute": "guest-shutdown", "arguments": {"mode": mode}}, deadline)

        self._guarded(deliver, "guest-shutdown")
        self._await_refusal(min(deadline, time.monotonic() + REFUSAL_WAIT))

    def boot_id(self, timeout: float = DEFAULT_TIMEOUT) -> str:
        """The Linux guest's boot id, which every boot draws anew (read through the
        agent's file commands)."""
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(deadline - time.monotonic(), 0.001)

        handle = self.execute("guest-file-open", {"path": BOOT_ID_PATH}, timeout=left())
        try:
            read = self.execute("guest-file-read", {"handle": handle}, timeout=left())
        finally:
            if self._sock is not None:
                self.execute("guest-file-close", {"handle": handle}, timeout=left())
        if not isinstance(read, dict):
            raise GuestAgentError(f"guest-file-read returned {read!r}")
        return base64.b64decode(str(read.get("buf-b64", ""))).decode(errors="replace").strip()

    def run(self, argv: Sequence[str], stdin: bytes | None = None,
            timeout: float = DEFAULT_TIMEOUT) -> ExecResult:
        """Run a program in the guest (``guest-exec``) and wait until it has exited.

        ``guest-exec`` itself returns as soon as the program started; only
        ``guest-exec-status`` says when it is done (a ``sync`` run without waiting
        for it has not synced anything yet).
        """
        deadline = time.monotonic() + timeout
        arguments: dict[str, Any] = {"path": argv[0], "arg": list(argv[1:]),
                                     "capture-output": True}
        if stdin is not None:
            arguments["input-data"] = base64.b64encode(stdin).decode()
        started = self.execute("guest-exec", arguments, timeout=timeout)
        pid = started["pid"] if isinstance(started, dict) else None
        if not isinstance(pid, int):
            raise GuestAgentError(f"guest-exec returned {started!r}")
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OperationTimedOut(f"{argv[0]} (pid {pid}) did not exit in time in the guest")
            status = self.execute("guest-exec-status", {"pid": pid}, timeout=remaining)
            if isinstance(status, dict) and status.get("exited"):
                code = status.get("exitcode")
                return ExecResult(
                    exit_code=int(code) if code is not None else -int(status.get("signal", 0)),
                    stdout=base64.b64decode(str(status.get("out-data", ""))),
                    stderr=base64.b64decode(str(status.get("err-data", ""))),
                )
            time.sleep(min(_EXEC_POLL, max(deadline - time.monotonic(), 0)))

    def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Any:
        """Run a command that has a reply and return its ``return`` value."""
        deadline = time.monotonic() + timeout
        message: dict[str, Any] = {"execute": command}
        if arguments is not None:
            message["arguments"] = arguments

        def run() -> Any:
            self._sync(deadline)
            self._send(message, deadline)
            reply = self._read_message(deadline)
            if "error" in reply:
                error = reply["error"] if isinstance(reply["error"], dict) else {}
                raise GuestAgentError(
                    f"{command}: {error.get('desc', reply['error'])}", str(error.get("class", ""))
                )
            if "return" not in reply:
                raise GuestAgentError(f"{command}: unexpected reply {reply!r}")
            return reply["return"]

        return self._guarded(run, command)

    # ---------------------------------------------------------------- internals

    def _await_refusal(self, deadline: float) -> None:
        """Read what the agent says after ``guest-shutdown``, up to its answer to a
        sync sent behind it: an error reply on the way is the guest's refusal.

        The sync goes without a leading 0xFF, which qemu-ga would answer with a
        parse-error line of its own.  Silence or a closed connection is no refusal:
        the agent may already be gone with its guest.
        """
        sync_id = next(self._ids) % 2**31
        try:
            self._send({"execute": "guest-sync-delimited", "arguments": {"id": sync_id}},
                       deadline)
            while True:
                reply = _parse(self._read_line(deadline).lstrip(_SENTINEL))
                if reply is None:
                    continue
                if reply.get("return") == sync_id:
                    return
                if "error" in reply:
                    error = reply["error"] if isinstance(reply["error"], dict) else {}
                    raise GuestAgentError(
                        f"guest-shutdown: {error.get('desc', reply['error'])}",
                        str(error.get("class", "GenericError")),
                    )
        except (TimeoutError, OSError):
            self.close()
        except GuestAgentError as exc:
            if exc.error_class:
                raise
            self.close()

    def _guarded(self, action: Callable[[], _T], what: str) -> _T:
        try:
            return action()
        except TimeoutError as exc:
            self.close()
            raise OperationTimedOut(
                f"the guest agent at {self.socket_path} did not answer {what} in time"
            ) from exc
        except GuestAgentError as exc:
            # An error reply leaves the stream in step; anything else may not.
            if not exc.error_class:
                self.close()
            raise
        except OSError as exc:
            self.close()
            raise GuestAgentError(f"guest agent connection failed: {exc}") from exc

    def _connected(self, deadline: float) -> socket.socket:
        if self._sock is not None:
            return self._sock
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                sock.connect(str(self.socket_path))
            except OSError as exc:
                sock.close()
                if exc.errno not in _RETRYABLE_CONNECT:
                    raise
                if time.monotonic() >= deadline:
                    raise TimeoutError(str(exc)) from exc
                time.sleep(min(0.05, max(deadline - time.monotonic(), 0)))
                continue
            self._sock = sock
            self._buffer = b""
            return sock

    def _send(self, message: dict[str, Any], deadline: float, resync: bool = False) -> None:
        sock = self._connected(deadline)
        payload = json.dumps(message).encode() + b"\n"
        sock.settimeout(self._remaining(deadline))
        sock.sendall(_SENTINEL + payload if resync else payload)

    def _sync(self, deadline: float) -> None:
        sync_id = next(self._ids) % 2**31
        self._send(
            {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}, deadline, True
        )
        while True:
            # Everything before the agent's 0xFF is stale output of older commands.
            while _SENTINEL not in self._buffer:
                self._buffer = b""
                self._fill(deadline)
            self._buffer = self._buffer[self._buffer.index(_SENTINEL) + 1 :]
            # A stray 0xFF (garbage, an older sync) is followed by something else.
            reply = _parse(self._read_line(deadline))
            if reply is not None and reply.get("return") == sync_id:
                return

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while True:
            line = self._read_line(deadline)
            if not line:
                continue
            message = _parse(line)
            if message is None:
                raise GuestAgentError(f"malformed reply {line[:200]!r}")
            return message

    def _read_line(self, deadline: float) -> bytes:
        while b"\n" not in self._buffer:
            self._fill(deadline)
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.strip()

    def _fill(self, deadline: float) -> None:
        sock = self._connected(deadline)
        sock.settimeout(self._remaining(deadline))
        chunk = sock.recv(65536)
        if not chunk:
            raise GuestAgentError("the guest agent socket was closed")
        self._buffer += chunk

    @staticmethod
    def _remaining(deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed")
        return remaining


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None
