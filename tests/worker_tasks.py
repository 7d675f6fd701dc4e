"""Operations that exist only for tests; test workers load this with --include."""

from __future__ import annotations

import errno
import os
import time

from api.protocol.tasks import TaskSpec
from workers.failures import IllegalValue, IncompatibleSavedState
from workers.runtime import TaskRun, operation

OS_ERRORS = {
    "enospc": errno.ENOSPC,
    "enoent": errno.ENOENT,
    "eacces": errno.EACCES,
    "eexist": errno.EEXIST,
    "eio": errno.EIO,
    "enomem": errno.ENOMEM,
}


@operation(TaskSpec("tests.fail", ("kind",), cancelable=False))
def fail(run: TaskRun, kind: str) -> None:
    run.report_progress(40)
    if kind in OS_ERRORS:
        raise OSError(OS_ERRORS[kind], os.strerror(OS_ERRORS[kind]), "disk.img")
    if kind == "memory":
        raise MemoryError()
    if kind == "illegal":
        raise IllegalValue("size 9 TiB is beyond the VHD maximum")
    if kind == "incompatible":
        raise IncompatibleSavedState("saved with 256 MB, configured with 128 MB")
    raise RuntimeError(f"boom: {kind}")


@operation(TaskSpec("tests.overrun", (), cancelable=True), soft_time_limit=1)
def overrun(run: TaskRun) -> None:
    run.sleep(60)


@operation(TaskSpec("tests.uncancelable_sleep", ("seconds",), cancelable=False))
def uncancelable_sleep(run: TaskRun, seconds: float) -> None:
    time.sleep(seconds)


@operation(TaskSpec("tests.write_marker", ("path",), cancelable=True))
def write_marker(run: TaskRun, path: str) -> None:
    """Appends one line per execution: proves how many times a task ran."""
    with open(path, "a") as marker:
        marker.write(f"{run.task_id}\n")


@operation(TaskSpec("tests.marked_echo", ("path", "value", "seconds"), cancelable=False))
def marked_echo(run: TaskRun, path: str, value: int, seconds: float) -> dict[str, int]:
    """Appends one line per execution, then returns its value: proves how many times a
    task ran and that its result is its own."""
    with open(path, "a") as marker:
        marker.write(f"{run.task_id}\n")
    time.sleep(seconds)
    return {"value": value}
