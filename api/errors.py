"""Every exception the vmtask client raises.

    VMTaskError                       .hresult on every instance
    ├── InvalidTimeoutError           also ValueError; E_POINTER
    ├── InvalidArgumentError          also ValueError; E_INVALIDARG
    ├── TaskNotFoundError
    ├── TaskNotCancelableError
    ├── InvalidStateError             the VM's state forbids the operation
    ├── NotFoundError                 a VM, disk or host that does not exist
    │   └── HostUnavailableError      no live worker serves the host
    ├── OperationFailedError          a synchronous query (e.g. get_hard_disk) failed
    ├── TaskFailedError               how Celery's result API and Flower show a task that
    │                                 ended without success (never raised by VMTask)
    └── BrokerUnavailableError        Redis cannot be reached
        └── BrokerAccessDeniedError   Redis refused our login or a command (password,
                                      ACL): E_ACCESSDENIED, raised at once, never retried

A task that *runs* and fails does not raise: it completes with a `VMTaskResult`
and an HRESULT, read from the `VMTask` handle.
"""

from __future__ import annotations

from api.protocol import hresults


class VMTaskError(Exception):
    """Base of the tree; ``hresult`` is the unsigned 32-bit HRESULT."""

    default_hresult = hresults.E_UNEXPECTED

    def __init__(self, message: str, hresult: int | None = None) -> None:
        super().__init__(message)
        self.hresult = self.default_hresult if hresult is None else hresult

    def __str__(self) -> str:
        return f"{super().__str__()} [{hresults.format_hresult(self.hresult)}]"


class InvalidTimeoutError(VMTaskError, ValueError):
    default_hresult = hresults.E_POINTER


class InvalidArgumentError(VMTaskError, ValueError):
    default_hresult = hresults.E_INVALIDARG


class TaskNotFoundError(VMTaskError):
    default_hresult = hresults.E_INVALIDARG


class TaskNotCancelableError(VMTaskError):
    default_hresult = hresults.E_UNEXPECTED


class InvalidStateError(VMTaskError):
    default_hresult = hresults.INVALID_STATE


class NotFoundError(VMTaskError):
    default_hresult = hresults.FILE_NOT_FOUND


class HostUnavailableError(NotFoundError):
    default_hresult = hresults.SERVER_FAULT


class OperationFailedError(VMTaskError):
    """A call that waits for its task (e.g. `get_hard_disk`) saw the task fail."""


class TaskFailedError(VMTaskError):
    """A task that ended without success, as Celery's result API and Flower show it.

    Its ``args`` are plain JSON (the VMTaskResult name, the HRESULT in hex, the
    description), so it reads the same in Flower, in ``AsyncResult.result`` and in
    ``celery result``.  `VMTask` never raises it: a task's failure is its result.
    """

    def __init__(self, result: str, hresult: int | str | None = None,
                 description: str = "") -> None:
        code = (self.default_hresult if hresult is None
                else int(hresult.split()[0], 16) if isinstance(hresult, str) else hresult)
        super().__init__(description or result, code)
        self.args = (result, f"0x{code:08X}", description)
        self.result = result
        self.description = description

    def __str__(self) -> str:
        result, code, description = self.args
        return f"{result} {code}: {description}" if description else f"{result} {code}"


class BrokerUnavailableError(VMTaskError):
    default_hresult = hresults.SERVER_FAULT


class BrokerAccessDeniedError(BrokerUnavailableError):
    """Redis answered, and refused: a wrong or missing password, a disabled or
    unknown user, or an ACL that lacks a command.  Not transient, so no entry point
    retries it: it is raised at once with E_ACCESSDENIED (0x80070005)."""

    default_hresult = hresults.ACCESS_DENIED


__all__ = [
    "BrokerAccessDeniedError",
    "BrokerUnavailableError",
    "HostUnavailableError",
    "InvalidArgumentError",
    "InvalidStateError",
    "InvalidTimeoutError",
    "NotFoundError",
    "OperationFailedError",
    "TaskFailedError",
    "TaskNotCancelableError",
    "TaskNotFoundError",
    "VMTaskError",
]
