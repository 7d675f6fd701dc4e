"""`ride_out`, the worker's one way through a Redis outage, and how an outage that
outlasts it is classified (the real outages: tests/integration/test_transfer_faults.py)."""

from __future__ import annotations

import pytest
import redis

from api.enums import VMTaskResult
from api.protocol import hresults
from workers.outage import ride_out
from workers.runtime import failure_of


def test_a_call_is_made_again_until_redis_answers() -> None:
    failures = [redis.ConnectionError("Error 111"), redis.BusyLoadingError("LOADING"),
                redis.TimeoutError("timed out")]
    pauses: list[float] = []

    def call() -> str:
        if failures:
            raise failures.pop(0)
        return "answer"

    assert ride_out(call, seconds=60, what="testing", sleep=pauses.append) == "answer"
    assert len(pauses) == 3


def test_a_redis_that_stays_away_raises_its_last_error() -> None:
    def call() -> None:
        raise redis.ConnectionError("Error 111")

    with pytest.raises(redis.ConnectionError):
        ride_out(call, seconds=0.05, what="testing", pause=0.01)


def test_other_errors_are_not_retried() -> None:
    calls: list[int] = []

    def call() -> None:
        calls.append(1)
        raise redis.ResponseError("WRONGTYPE")

    with pytest.raises(redis.ResponseError):
        ride_out(call, seconds=60, what="testing", sleep=lambda _: None)
    assert calls == [1]


def test_an_outage_that_outlasts_the_ride_is_a_timeout_not_unexpected() -> None:
    failure = failure_of(redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379."))
    assert (failure.result, failure.hresult) == (VMTaskResult.TimeOutError, hresults.TIMEOUT)
    assert "Redis did not answer" in failure.description
    # A refused password is no outage: it stays what it was.
    assert failure_of(redis.AuthenticationError("invalid password")).result is (
        VMTaskResult.UnexpectedError)
