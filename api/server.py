"""`VirtualServer`: the producer's entry point (IVMVirtualServer).

It joins the disk and VM operations, both built on `ServerCore`, which records and
enqueues every operation.
"""

from __future__ import annotations

from api.backups import BackupOperations
from api.disks import DiskOperations
from api.evacuation import EvacuationOperations
from api.queued import MAX_PING_DURATION_MS, MAX_PING_STEPS
from api.vms import VMOperations

__all__ = ["MAX_PING_DURATION_MS", "MAX_PING_STEPS", "VirtualServer"]



class VirtualServer(DiskOperations, VMOperations, EvacuationOperations,
                    BackupOperations):
    """Hosts, tasks, disks and VMs of one vmtask deployment (one Redis)."""
