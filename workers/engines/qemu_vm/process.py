"""A VM's QEMU process: finding it, waiting for it, killing it, cleaning up after it.

A process counts as "ours" only if ``/proc/<pid>/cmdline`` is a qemu-system binary
started with this VM's pidfile, so a stale pidfile or a reused pid is never mistaken
for the VM; signals go through a pidfd opened before that check.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Callable
from pathlib import Path

from workers.engines.qemu_vm.config import VMPaths, fingerprint_path
from workers.failures import OperationFailed

POLL_INTERVAL = 0.05


def _read_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The state letter follows the last ')' (the command name may contain one).
    if stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] in ("Z", "X"):
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]]


def _is_our_qemu(pid: int, paths: VMPaths) -> bool:
    argv = _read_cmdline(pid)
    if not argv or not os.path.basename(argv[0]).startswith("qemu-system"):
        return False
    try:
        pidfile = argv[argv.index("-pidfile") + 1]
    except (ValueError, IndexError):
        return False
    return os.path.realpath(pidfile) == os.path.realpath(paths.pidfile)


def find_pid(paths: VMPaths) -> int | None:
    """The pid of this VM's live QEMU, or None.

    The pidfile is the fast path; /proc is scanned as well because QEMU's pidfile can
    be deleted behind its back, and a VM must never be reported dead while it runs.
    """
    with contextlib.suppress(OSError, ValueError):
        pid = int(paths.pidfile.read_text().strip())
        if pid > 0 and _is_our_qemu(pid, paths):
            return pid
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and _is_our_qemu(int(entry.name), paths):
            return int(entry.name)
    return None


def is_alive(paths: VMPaths) -> bool:
    return find_pid(paths) is not None


def wait_pid(pid: int, paths: VMPaths, timeout: float) -> bool:
    """True once ``pid`` is gone (or is no longer this VM's QEMU)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:
        return _wait_until(lambda: not _is_our_qemu(pid, paths), timeout)
    try:
        # Re-check after opening: the pid may have been reused in between.
        if not _is_our_qemu(pid, paths):
            return True
        readable, _, _ = select.select([pidfd], [], [], max(0.0, timeout))
        return bool(readable) or not _is_our_qemu(pid, paths)
    finally:
        os.close(pidfd)


def wait_for_exit(paths: VMPaths, timeout: float) -> bool:
    """Wait until the VM's QEMU has exited; True if it did within ``timeout`` seconds."""
    pid = find_pid(paths)
    return True if pid is None else wait_pid(pid, paths, timeout)


def _kill(pid: int, paths: VMPaths) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        # Signal through the pidfd, after the identity check, so a reused pid is
        # never hit.
        if _is_our_qemu(pid, paths):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)


def force_stop(paths: VMPaths, timeout: float = 10.0) -> None:
    """SIGKILL whatever QEMU this VM has and wait for it; used on failure paths."""
    deadline = time.monotonic() + timeout
    while (pid := find_pid(paths)) is not None:
        if time.monotonic() > deadline:
            raise OperationFailed(f"QEMU process {pid} of {paths.directory.name} does not die")
        _kill(pid, paths)
        wait_pid(pid, paths, max(0.0, deadline - time.monotonic()))


def _wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(interval, remaining))


def cleanup(paths: VMPaths) -> None:
    """Remove the socket, pidfile and partial save of a VM that is not running.

    Logs and a completed saved state stay.  Refuses (OperationFailed) while QEMU runs.
    """
    pid = find_pid(paths)
    if pid is not None:
        raise OperationFailed(f"VM {paths.directory.name} is still running (pid {pid})")
    for path in (
        paths.qmp_socket,
        paths.pidfile,
        paths.state_tmp,
        fingerprint_path(paths.state_tmp),
    ):
        path.unlink(missing_ok=True)
