"""The operations that only check their arguments and queue a task.

They need no Redis read before the submit, so the sync server (`VirtualServer`)
and the asyncio one (`api.aio.AsyncVirtualServer`) share them as they are: each
server's `_queue` records and enqueues, returning a `VMTask` for the first and an
awaitable of an `AsyncVMTask` for the second.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from api.arguments import (
    check_int,
    check_relative_path,
    check_text,
    disk_size_bytes,
    format_for_name,
)
from api.errors import InvalidArgumentError
from api.protocol import tasks
from api.protocol.tasks import TaskSpec

T = TypeVar("T")
MAX_PING_DURATION_MS = 3_600_000
MAX_PING_STEPS = 10_000


class QueuedOperations(Generic[T]):
    def _queue(self, spec: TaskSpec, description: str, kwargs: dict[str, Any],
               host: str | None) -> T:
        raise NotImplementedError

    def ping(self, duration_ms: int = 0, steps: int = 0, *, host: str | None = None) -> T:
        """A cancelable task that sleeps `duration_ms` and reports `steps` progress updates."""
        check_int("duration_ms", duration_ms, 0, MAX_PING_DURATION_MS)
        check_int("steps", steps, 0, MAX_PING_STEPS)
        return self._queue(tasks.PING, f"Ping: {duration_ms} ms in {steps} steps",
                           {"duration_ms": duration_ms, "steps": steps}, host)

    def _create(self, spec: TaskSpec, what: str, path: str, host: str | None,
                **kwargs: Any) -> T:
        check_relative_path(path)
        return self._queue(spec, f"Creating {what} {path}", {"path": path, **kwargs}, host)

    def create_fixed_virtual_hard_disk(self, path: str, size_mb: int, *,
                                       host: str | None = None) -> T:
        size = disk_size_bytes(path, size_mb)
        return self._create(tasks.DISK_CREATE_FIXED, f"fixed-size disk of {size_mb} MB", path,
                            host, size_bytes=size)

    def create_dynamic_virtual_hard_disk(self, path: str, size_mb: int, *,
                                         host: str | None = None) -> T:
        size = disk_size_bytes(path, size_mb)
        return self._create(tasks.DISK_CREATE_DYNAMIC, f"dynamic disk of {size_mb} MB", path,
                            host, size_bytes=size)

    def create_differencing_virtual_hard_disk(self, path: str, parent_path: str, *,
                                              host: str | None = None) -> T:
        check_relative_path(path)
        check_relative_path(parent_path, "parent_path")
        if format_for_name(path) != "qcow2":
            raise InvalidArgumentError(
                f"A differencing disk must be a .qcow2 overlay, not {path!r}: qemu cannot "
                "write VHD differencing disks (the parent may be any format)")
        format_for_name(parent_path)
        return self._create(tasks.DISK_CREATE_DIFFERENCING,
                            f"differencing disk over {parent_path}:",
                            path, host, parent_path=parent_path)

    def create_host_drive_virtual_hard_disk(self, path: str, host_drive: str, *,
                                            read_only: bool = True,
                                            host: str | None = None) -> T:
        check_relative_path(path)
        check_text(host_drive, "host_drive", max_bytes=4096)
        if not host_drive.startswith("/"):
            raise InvalidArgumentError(f"host_drive must be an absolute host path, "
                                       f"not {host_drive!r}")
        if format_for_name(path) != "qcow2":
            raise InvalidArgumentError(f"A host-drive disk must be a .qcow2 file, not {path!r}")
        return self._create(tasks.DISK_CREATE_HOST_DRIVE, f"host-drive disk for {host_drive}:",
                            path, host, host_drive=host_drive, read_only=bool(read_only))
