"""What a user sees of a running VM: its screen (QMP screendump), its VNC server
and its serial console log.

The serial console is a QEMU ``file`` chardev opened with O_APPEND, so the log
can be rotated behind QEMU's back by copy-and-truncate: QEMU's next write lands
at the new end of the file.  `rotate_serial_log` keeps one previous generation;
the host calls it on every heartbeat, so the two files together stay near twice
the limit (plus what a guest writes within one beat).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from workers.engines.qemu_vm.config import VMPaths
from workers.engines.qemu_vm.monitor import connect
from workers.failures import OperationFailed

# A screendump PNG of even a 4K display stays far below this.
MAX_SCREENSHOT_BYTES = 32 * 1024 * 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def screendump(paths: VMPaths) -> bytes:
    """A PNG of the VM's display right now; works while the VM is paused too."""
    target = paths.screendump_file
    target.unlink(missing_ok=True)
    try:
        with connect(paths) as monitor:
            monitor.execute("screendump", {"filename": str(target), "format": "png"})
        size = target.stat().st_size
        if size > MAX_SCREENSHOT_BYTES:
            raise OperationFailed(f"The screenshot is {size} bytes, over the limit")
        data = target.read_bytes()
    finally:
        target.unlink(missing_ok=True)
    if not data.startswith(PNG_SIGNATURE):
        raise OperationFailed("QEMU's screendump is not a PNG")
    return data


def setup_vnc(paths: VMPaths, password: str) -> str | None:
    """Set this start's VNC password; the ``host:port`` the server listens on, or None."""
    with connect(paths) as monitor:
        info = monitor.execute("query-vnc")
        if not info.get("enabled"):
            return None
        monitor.execute("set_password", {"protocol": "vnc", "password": password})
    host, port = str(info.get("host", "")), str(info.get("service", ""))
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def rotate_serial_log(paths: VMPaths, max_bytes: int) -> bool:
    """Move a log over ``max_bytes`` to its previous generation; True if it did.

    Copy then truncate, as logrotate's copytruncate: QEMU keeps its descriptor.
    What the guest writes between the copy and the truncation is lost.
    """
    log = paths.serial_log
    try:
        if log.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    staging = paths.serial_log_rotated.with_name(paths.serial_log_rotated.name + ".tmp")
    shutil.copyfile(log, staging)
    os.replace(staging, paths.serial_log_rotated)
    os.truncate(log, 0)
    return True


def _tail(path: Path, limit: int) -> bytes:
    if limit <= 0:
        return b""
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        handle.seek(max(0, size - limit))
        return handle.read(limit)
    return b""


def read_console(paths: VMPaths, tail_bytes: int) -> str:
    """The last ``tail_bytes`` of the serial console, across one rotation."""
    current = _tail(paths.serial_log, tail_bytes)
    older = _tail(paths.serial_log_rotated, tail_bytes - len(current))
    return (older + current).decode("utf-8", errors="replace")
