"""Running qemu-img: one child process under cancel, deadline and progress reporting.

qemu-img runs in its own session, so a cancel or a timeout kills its whole process
group; its ``-p`` progress records are parsed from stdout and reported through a
`ProgressSpan`; a failure is classified from its stderr by `failure_from_stderr`.
`Deadline` is the time budget of an operation that runs several steps.
"""

from __future__ import annotations

import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from workers.engines.context import OperationContext, ProgressSpan
from workers.engines.qemu_img.errors import clean_stderr, failure_from_stderr
from workers.engines.qemu_img.sizes import KiB
from workers.failures import Cancelled, OperationFailed, OperationTimedOut

POLL_INTERVAL = 0.1
KILL_GRACE = 2.0
_PROGRESS = re.compile(rb"\(\s*(\d+(?:\.\d+)?)/100%\)")
_STDERR_LIMIT = 64 * KiB


class _ProgressParser:
    """Finds qemu-img's ``(12.34/100%)`` records in stdout chunks split anywhere."""

    def __init__(self, progress: ProgressSpan) -> None:
        self._progress = progress
        self._pending = b""
        self.last = -1.0
        self.advanced_at = time.monotonic()

    def feed(self, chunk: bytes) -> None:
        data = self._pending + chunk
        end = 0
        for match in _PROGRESS.finditer(data):
            value = float(match.group(1))
            self._progress.step(value)
            if value > self.last:
                self.last, self.advanced_at = value, time.monotonic()
            end = match.end()
        # Only a partial record can span chunks, and records are short.
        self._pending = data[end:][-64:]


# qemu-img runs in its own session (so a cancel can kill its whole group), which
# also means it would outlive a worker killed with -9 and go on writing.  setpriv
# (util-linux, essential on Debian) sets the parent-death signal, kept across exec.
_DIE_WITH_PARENT: list[str] = (
    ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
)


def _qemu_img_binary() -> str:
    return shutil.which("qemu-img") or "qemu-img"


def _child_environment() -> dict[str, str]:
    # The error mapping reads English strerror() texts.
    return {**os.environ, "LC_ALL": "C", "LANG": "C"}


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL it after a grace period, and reap it.

    The group id equals the pid (start_new_session); it cannot be reused while the
    leader is unreaped, so the signals are only sent while ``returncode`` is None.
    """
    if process.returncode is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=KILL_GRACE)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()



def run_qemu_img(
    args: Sequence[str],
    context: OperationContext,
    *,
    progress_range: tuple[float, float] = (0.0, 100.0),
    timeout: float | None = None,
    cancelable: bool = True,
    pass_fds: Sequence[int] = (),
    stall: Stall | None = None,
) -> str:
    """Run ``qemu-img <args>`` and return its stdout.

    qemu-img runs in its own session, so cancel and timeout kill its whole process
    group.  ``-p`` progress records are scaled into ``progress_range`` and reported
    monotonically.  ``cancel_requested()`` is polled about every `POLL_INTERVAL`
    seconds unless ``cancelable`` is false (for steps that modify an image in place,
    where stopping halfway is worse than finishing).  Failures are mapped from stderr
    by `failure_from_stderr`.  With ``stall``, a run whose progress and output both
    stand still for ``stall.seconds`` is killed and ends `OperationTimedOut`.
    """
    if cancelable and context.cancel_requested():
        raise Cancelled()
    deadline = None if timeout is None else time.monotonic() + timeout
    action = f"qemu-img {args[0]}" if args else "qemu-img"
    # The argument list as run (secret-looking option values are redacted by the
    # log; no argument vmtask builds holds one: TLS credentials are a directory).
    context.log(f"run: {shlex.join(['qemu-img', *args])}")
    started = time.monotonic()
    try:
        process = subprocess.Popen(
            [*_DIE_WITH_PARENT, _qemu_img_binary(), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env=_child_environment(),
            pass_fds=tuple(pass_fds),
        )
    except FileNotFoundError as exc:
        raise OperationFailed("qemu-img is not installed on this worker host") from exc

    parser = _ProgressParser(ProgressSpan(context, *progress_range))
    stdout = bytearray()
    stderr = bytearray()
    assert process.stdout is not None and process.stderr is not None

    next_poll = time.monotonic() + POLL_INTERVAL

    def check_stop() -> None:
        nonlocal next_poll
        now = time.monotonic()
        # Progress output wakes the loop far more often than cancel needs polling,
        # and cancel_requested() may be a Redis round trip.
        if cancelable and now >= next_poll:
            next_poll = now + POLL_INTERVAL
            if context.cancel_requested():
                kill_group(process)
                raise Cancelled()
        if deadline is not None and now >= deadline:
            kill_group(process)
            raise OperationTimedOut(f"{action} did not finish within {timeout:g} s")
        if stall is not None and stall.stuck(now, parser.advanced_at):
            kill_group(process)
            raise OperationTimedOut(f"{action} received nothing for {stall.seconds:g} s")

    try:
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ, stdout)
            selector.register(process.stderr, selectors.EVENT_READ, stderr)
            while selector.get_map():
                for key, _events in selector.select(POLL_INTERVAL):
                    chunk = os.read(key.fd, 64 * KiB)
                    if not chunk:
                        selector.unregister(key.fileobj)
                        continue
                    buffer: bytearray = key.data
                    if buffer is stdout:
                        parser.feed(chunk)
                        buffer.extend(chunk)
                    elif len(buffer) < _STDERR_LIMIT:
                        buffer.extend(chunk)
                check_stop()
        while True:
            try:
                returncode = process.wait(timeout=POLL_INTERVAL)
                break
            except subprocess.TimeoutExpired:
                check_stop()
    finally:
        # Whatever escaped above (even a failing cancel_requested()), no qemu-img
        # may outlive this call.
        kill_group(process)
        process.stdout.close()
        process.stderr.close()

    context.log(f"{action}: exit status {returncode} after {time.monotonic() - started:.1f} s"
                + (f": {clean_stderr(stderr)}" if returncode != 0 else ""))
    if returncode != 0:
        paths = [arg for arg in args if os.sep in arg]
        raise failure_from_stderr(clean_stderr(stderr), action, paths)
    return stdout.decode(errors="replace")


class Stall:
    """Watches a transfer for standing still: neither its ``-p`` progress nor the size
    of its ``output`` changed for ``seconds``.  (The output grows between progress
    records, which are 1% apart: long on a big disk over a slow link.)"""

    def __init__(self, seconds: float, output: Path) -> None:
        self.seconds = seconds
        self.output = output
        self._size: tuple[int, int] | None = None
        self._changed_at = time.monotonic()

    def stuck(self, now: float, progressed_at: float) -> bool:
        try:
            status = os.stat(self.output)
            size: tuple[int, int] | None = (status.st_size, status.st_blocks)
        except FileNotFoundError:
            size = None
        if size != self._size:
            self._size, self._changed_at = size, now
        return now - max(self._changed_at, progressed_at) > self.seconds


class Deadline:
    """The time left of an operation's ``timeout``; `OperationTimedOut` once it is spent."""

    def __init__(self, timeout: float | None) -> None:
        self._timeout = timeout
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        if self._end is None:
            return None
        left = self._end - time.monotonic()
        if left <= 0:
            raise OperationTimedOut(f"The operation did not finish within {self._timeout:g} s")
        return left
