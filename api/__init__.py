"""vmtask's producer library: VM and disk operations as tracked, cancellable tasks.

    from api import VirtualServer
    server = VirtualServer()            # VMTASK_REDIS_URL, VMTASK_HOST
    task = server.ping(duration_ms=500, steps=5)
    task.wait_for_completion(-1)
    task.result                          # VMTaskResult.Success

This package never imports `workers`: a producer needs Redis, not QEMU.
"""

from api import errors
from api.disks import HardDisk
from api.enums import VMHardDiskType, VMTaskResult, VMVMState
from api.guest import GuestOS
from api.protocol.records import TaskSnapshot
from api.protocol.vmstate import VMStateEvent
from api.server import VirtualServer
from api.settings import Settings
from api.task import VMTask
from api.vms import VirtualMachine

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
