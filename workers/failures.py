"""Every error a worker raises, and how a failure becomes plain data.

Engines and tasks raise these when they know what went wrong, or let ordinary
exceptions (``OSError`` with an errno, ``MemoryError``, ``TimeoutError``) escape;
`classify` maps both to a `Failure`: a `VMTaskResult`, an HRESULT and a text.
Nothing here is ever pickled: the worker stores the three fields of `Failure` as
strings in the task record.  Celery and Redis are not imported here, so that an
engine loads neither: what only the runtime meets (Celery's soft time limit,
Redis's ACL refusals) is classified by `workers.runtime.failure_of`.

    OperationFailed              UnexpectedError, E_UNEXPECTED unless the raiser says
    ├── Cancelled                Cancelled, E_ABORT
    ├── DiskError                DiskRelatedError; the precise HRESULT, else WRITE_FAULT
    │   └── CorruptImage         DISK_CORRUPT
    ├── DiskInUse                INVALID_STATE: attached to a VM, or another's parent
    ├── OutOfMemory              OutOfMemoryError, E_OUTOFMEMORY
    ├── IncompatibleSavedState   IncompatibleSavedStateError
    ├── OperationTimedOut        TimeOutError, TIMEOUT
    ├── IllegalValue             IllegalValueError, E_INVALIDARG
    ├── PeerFailed               the other side of a transfer's own result and HRESULT
    ├── VMNotRunning             no live QEMU process, or its QMP socket is gone
    ├── QMPCommandFailed         QEMU answered a QMP command with an error
    └── GuestAgentError          the guest agent answered with an error, or went away

    api.errors.InvalidStateError  the producer's own class, raised by a worker that
                                  finds the VM's state forbids the operation:
                                  UnexpectedError, INVALID_STATE
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any

from api.enums import VMTaskResult
from api.errors import InvalidStateError
from api.protocol import hresults


@dataclass(frozen=True)
class Failure:
    result: VMTaskResult
    hresult: int
    description: str


class OperationFailed(Exception):
    """An engine failure whose result and HRESULT are known."""

    result = VMTaskResult.UnexpectedError
    hresult = hresults.E_UNEXPECTED
    # The JSON a composite task recorded before it failed (`workers.composite`).
    partial_output: Any = None

    def __init__(self, description: str, hresult: int | None = None) -> None:
        super().__init__(description)
        if hresult is not None:
            self.hresult = hresult


class Cancelled(OperationFailed):
    result = VMTaskResult.Cancelled
    hresult = hresults.E_ABORT

    def __init__(self, description: str = "The task was cancelled") -> None:
        super().__init__(description)


class DiskError(OperationFailed):
    """Image and file I/O; pass the precise HRESULT (disk full, not found, ...)."""

    result = VMTaskResult.DiskRelatedError
    hresult = hresults.WRITE_FAULT


class CorruptImage(DiskError):
    hresult = hresults.DISK_CORRUPT


class OutOfMemory(OperationFailed):
    result = VMTaskResult.OutOfMemoryError
    hresult = hresults.E_OUTOFMEMORY


class IncompatibleSavedState(OperationFailed):
    result = VMTaskResult.IncompatibleSavedStateError
    hresult = hresults.INCOMPATIBLE_SAVED_STATE


class OperationTimedOut(OperationFailed):
    result = VMTaskResult.TimeOutError
    hresult = hresults.TIMEOUT


class IllegalValue(OperationFailed):
    result = VMTaskResult.IllegalValueError
    hresult = hresults.E_INVALIDARG


class DiskInUse(OperationFailed):
    """The image is attached to a VM or is another image's parent."""

    hresult = hresults.INVALID_STATE


class PeerFailed(OperationFailed):
    """The other side of the transfer ended without success; carries its outcome."""

    def __init__(self, description: str, result: VMTaskResult, hresult: int) -> None:
        super().__init__(description, hresult)
        self.result = result


class VMNotRunning(OperationFailed):
    """The VM has no live QEMU process, or its QMP socket is gone."""


class QMPCommandFailed(OperationFailed):
    """QEMU answered a QMP command with an error."""

    def __init__(self, command: str, error_class: str, description: str) -> None:
        super().__init__(f"QMP {command} failed: {description}")
        self.command = command
        self.error_class = error_class
        self.qemu_description = description


class GuestAgentError(OperationFailed):
    """The agent answered with an error (`error_class` set, and the description
    carries the agent's own text), or the connection broke (no class)."""

    def __init__(self, description: str, error_class: str = "") -> None:
        super().__init__(description)
        self.error_class = error_class


ERRNO_TO_HRESULT: dict[int, int] = {
    errno.ENOSPC: hresults.DISK_FULL,
    errno.EDQUOT: hresults.DISK_FULL,
    errno.ENOENT: hresults.FILE_NOT_FOUND,
    errno.EACCES: hresults.ACCESS_DENIED,
    errno.EPERM: hresults.ACCESS_DENIED,
    errno.EROFS: hresults.ACCESS_DENIED,
    errno.EEXIST: hresults.FILE_EXISTS,
    errno.EIO: hresults.WRITE_FAULT,
}


def classify(exc: BaseException) -> Failure:
    """Map any exception raised by a task body to its stored failure."""
    if isinstance(exc, OperationFailed):
        return Failure(exc.result, exc.hresult, str(exc))
    if isinstance(exc, InvalidStateError):
        return Failure(VMTaskResult.UnexpectedError, exc.hresult, str(exc.args[0]))
    if isinstance(exc, MemoryError):
        return Failure(VMTaskResult.OutOfMemoryError, hresults.E_OUTOFMEMORY, "Out of memory")
    if isinstance(exc, TimeoutError):
        return Failure(
            VMTaskResult.TimeOutError, hresults.TIMEOUT, "The operation's time limit expired"
        )
    if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
        return Failure(VMTaskResult.OutOfMemoryError, hresults.E_OUTOFMEMORY, str(exc))
    if isinstance(exc, OSError) and exc.errno is not None:
        hresult = ERRNO_TO_HRESULT.get(exc.errno, hresults.WRITE_FAULT)
        return Failure(VMTaskResult.DiskRelatedError, hresult, str(exc))
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return Failure(VMTaskResult.UnexpectedError, hresults.E_UNEXPECTED, text)
