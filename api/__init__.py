"""vmtask's producer library: VM and disk operations as tracked, cancellable tasks.

    from api import VirtualServer
    server = VirtualServer()            # VMTASK_REDIS_URL, VMTASK_HOST
    task = server.ping(duration_ms=500, steps=5)
    task.wait_for_completion(-1)
    task.result                          # VMTaskResult.Success

This package never imports `workers`: a producer needs Redis, not QEMU.  The
client classes load on first use, so that a worker's engine importing
`api.enums` or `api.protocol` loads neither Celery nor redis-py.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from api import errors
from api.enums import VMHardDiskType, VMTaskResult, VMVMState

if TYPE_CHECKING:
    from api.disks import HardDisk
    from api.guest import GuestOS
    from api.protocol.records import TaskSnapshot
    from api.protocol.vmstate import VMStateEvent
    from api.server import VirtualServer
    from api.settings import Settings
    from api.task import VMTask
    from api.vms import VirtualMachine

_HOMES = {
    "GuestOS": "api.guest",
    "HardDisk": "api.disks",
    "Settings": "api.settings",
    "TaskSnapshot": "api.protocol.records",
    "VMStateEvent": "api.protocol.vmstate",
    "VMTask": "api.task",
    "VirtualMachine": "api.vms",
    "VirtualServer": "api.server",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'api' has no attribute {name!r}")
    value = getattr(import_module(home), name)
    globals()[name] = value
    return value


__all__ = [
    "GuestOS",
    "HardDisk",
    "Settings",
    "TaskSnapshot",
    "VMHardDiskType",
    "VMStateEvent",
    "VMTask",
    "VMTaskResult",
    "VMVMState",
    "VirtualMachine",
    "VirtualServer",
    "errors",
]
