"""How a task's failure becomes plain data: a `VMTaskResult`, an HRESULT and a text.

Engines raise `OperationFailed` subclasses when they know what went wrong, or let
ordinary exceptions (``OSError`` with an errno, ``MemoryError``, Celery's soft time
limit) escape; `classify` maps both.  Nothing here is ever pickled: the worker stores
the three fields of `Failure` as strings in the task record.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

import redis
from celery.exceptions import SoftTimeLimitExceeded
from redis.exceptions import AuthenticationError, AuthorizationError

from api.enums import VMTaskResult
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
    if isinstance(exc, MemoryError):
        return Failure(VMTaskResult.OutOfMemoryError, hresults.E_OUTOFMEMORY, "Out of memory")
    if (isinstance(exc, redis.ConnectionError | redis.TimeoutError)
            and not isinstance(exc, AuthenticationError | AuthorizationError)):
        # Redis stayed away longer than the call rode out (`TaskRun.ride_out`).
        return Failure(VMTaskResult.TimeOutError, hresults.TIMEOUT,
                       f"Redis did not answer: {type(exc).__name__}: {exc}")
    if isinstance(exc, SoftTimeLimitExceeded | TimeoutError):
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
