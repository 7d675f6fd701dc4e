"""Exit codes: the CLI's contract for how a run ended, and the code for a result or error."""

from __future__ import annotations

from api import errors
from api.enums import VMTaskResult

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_BROKER = 3
EXIT_NOT_FOUND = 4
EXIT_TASK_BASE = 10
EXIT_INTERRUPTED = 130

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success (for a task: VMTaskResult.Success)",
    EXIT_ERROR: "an unexpected error, or a synchronous query that failed",
    EXIT_USAGE: "refused before anything was queued: bad usage or argument (E_INVALIDARG), "
                "a state that forbids the operation, a task that cannot be cancelled",
    EXIT_BROKER: "Redis cannot be reached",
    EXIT_NOT_FOUND: "no such task, disk, VM or live host",
    **{EXIT_TASK_BASE + int(r): f"the task ended {r.name}" for r in VMTaskResult if r},
    EXIT_INTERRUPTED: "interrupted: stopped waiting (a task left running keeps running)",
}


def exit_code_for(result: VMTaskResult | None) -> int:
    if result is VMTaskResult.Success:
        return EXIT_OK
    # None cannot happen for a complete task; treat it as UnexpectedError, not success.
    return EXIT_TASK_BASE + int(result if result is not None else VMTaskResult.UnexpectedError)


def exit_code_for_error(exc: errors.VMTaskError) -> int:
    if isinstance(exc, errors.BrokerUnavailableError):
        return EXIT_BROKER
    if isinstance(exc, errors.NotFoundError | errors.TaskNotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(exc, errors.InvalidArgumentError | errors.InvalidTimeoutError
                  | errors.InvalidStateError | errors.TaskNotCancelableError):
        return EXIT_USAGE
    return EXIT_ERROR
