"""The worker's error tree, as the task record stores it: each kind of exception a
task body lets escape becomes the same (result, HRESULT, text) it always did."""

from __future__ import annotations

import errno

import redis
from celery.exceptions import SoftTimeLimitExceeded

from api.enums import VMTaskResult
from api.errors import InvalidStateError
from api.protocol import hresults
from workers import failures
from workers.failures import Failure, classify
from workers.runtime import failure_of


def test_a_worker_refusing_a_vm_state_stores_invalid_state_with_the_plain_text() -> None:
    refused = InvalidStateError("VM 'a' is Running: cannot go to Saved")
    assert failure_of(refused) == Failure(VMTaskResult.UnexpectedError, hresults.INVALID_STATE,
                                          "VM 'a' is Running: cannot go to Saved")


def test_celerys_soft_time_limit_is_a_timeout() -> None:
    expected = Failure(VMTaskResult.TimeOutError, hresults.TIMEOUT,
                       "The operation's time limit expired")
    assert failure_of(SoftTimeLimitExceeded()) == expected
    assert classify(TimeoutError()) == expected


def test_a_redis_acl_refusal_is_access_denied_not_a_crash() -> None:
    failure = failure_of(redis.exceptions.NoPermissionError("NOPERM no permissions to run"))
    assert (failure.result, failure.hresult) == (VMTaskResult.UnexpectedError,
                                                 hresults.ACCESS_DENIED)
    assert failure.description.startswith("The operation stopped: Redis refused")
    other = failure_of(redis.exceptions.ResponseError("WRONGTYPE"))
    assert other.hresult == hresults.E_UNEXPECTED


def test_each_class_keeps_its_result_and_hresult() -> None:
    peer = failures.PeerFailed("peer", VMTaskResult.DiskRelatedError, hresults.DISK_FULL)
    cases: list[tuple[Exception, VMTaskResult, int]] = [
        (failures.Cancelled(), VMTaskResult.Cancelled, hresults.E_ABORT),
        (failures.CorruptImage("x"), VMTaskResult.DiskRelatedError, hresults.DISK_CORRUPT),
        (failures.DiskInUse("x"), VMTaskResult.UnexpectedError, hresults.INVALID_STATE),
        (failures.VMNotRunning("x"), VMTaskResult.UnexpectedError, hresults.E_UNEXPECTED),
        (failures.QMPCommandFailed("stop", "GenericError", "no"),
         VMTaskResult.UnexpectedError, hresults.E_UNEXPECTED),
        (failures.GuestAgentError("x"), VMTaskResult.UnexpectedError, hresults.E_UNEXPECTED),
        (peer, VMTaskResult.DiskRelatedError, hresults.DISK_FULL),
        (OSError(errno.ENOSPC, "full"), VMTaskResult.DiskRelatedError, hresults.DISK_FULL),
    ]
    for exc, result, hresult in cases:
        failure = failure_of(exc)
        assert (failure.result, failure.hresult) == (result, hresult), exc


def test_the_docstring_draws_every_worker_error_class() -> None:
    tree = failures.__doc__ or ""
    for name, value in vars(failures).items():
        if isinstance(value, type) and issubclass(value, failures.OperationFailed) \
                and value is not failures.OperationFailed:
            assert f"── {name} " in tree, f"{name} is missing from the tree in workers/failures.py"
