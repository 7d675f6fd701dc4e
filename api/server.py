"""`VirtualServer`: the producer's entry point (IVMVirtualServer).

It joins the disk and VM operations, both built on `ServerCore`, which records and
enqueues every operation.
"""

from __future__ import annotations

from api.arguments import check_int
from api.backups import BackupOperations
from api.disks import DiskOperations
from api.evacuation import EvacuationOperations
from api.protocol import tasks
from api.task import VMTask
from api.vms import VMOperations

MAX_PING_DURATION_MS = 3_600_000
MAX_PING_STEPS = 10_000


class VirtualServer(DiskOperations, VMOperations, EvacuationOperations,
                    BackupOperations):
    """Hosts, tasks, disks and VMs of one vmtask deployment (one Redis)."""

    def ping(self, duration_ms: int = 0, steps: int = 0, *, host: str | None = None) -> VMTask:
        """A cancelable task that sleeps `duration_ms` and reports `steps` progress updates."""
        check_int("duration_ms", duration_ms, 0, MAX_PING_DURATION_MS)
        check_int("steps", steps, 0, MAX_PING_STEPS)
        return self.submit(
            tasks.PING,
            description=f"Ping: {duration_ms} ms in {steps} steps",
            kwargs={"duration_ms": duration_ms, "steps": steps},
            host=host,
        )

