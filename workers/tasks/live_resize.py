"""hd.resize of a Running or Paused VM's disk: QMP ``block_resize`` on the node the
guest writes, under the VM's lock; the guest sees the new size at once (virtio-blk
reports a capacity change).

Only a plain disk: a VM with snapshots runs on its present overlay, whose layers
keep the size they were made with, and an undoable VM on its undo overlay, so both
are refused with `InvalidStateError` (as the producer refuses them first).
"""

from __future__ import annotations

import json
from typing import Any

from api.errors import InvalidStateError
from api.protocol import tasks
from workers.engines import qemu_img, qemu_vm
from workers.engines import snapshots as engine
from workers.engines.files import HostFiles
from workers.engines.qemu_vm import livesnap
from workers.failures import IllegalValue
from workers.runtime import TaskRun, operation
from workers.tasks.vms import begin, paths_of, vm_lock


@operation(tasks.VM_RESIZE_DISK)
def resize_disk(run: TaskRun, name: str, path: str, size_bytes: int) -> dict[str, Any]:
    with vm_lock(run, name):
        _client, record, _state = begin(run, name, None)
        disks: list[str] = json.loads(record["disks"])
        if path not in disks:
            raise IllegalValue(f"{path} is not a disk of VM {name!r}")
        if record.get("undoable") == "1":
            raise InvalidStateError(f"VM {name!r} is undoable: its disks do not grow live")
        paths = paths_of(run.settings, name)
        if engine.load(paths.directory) is not None:
            raise InvalidStateError(f"VM {name!r} has snapshots: its disks do not grow")
        files = HostFiles.of(run.settings)
        target = files.resolve(path, must_exist=True)
        current = qemu_img.info(target).virtual_size
        if size_bytes <= current:
            raise IllegalValue(f"{path} is {current} bytes: resize only grows a disk")
        device = livesnap.device_of(disks.index(path))
        run.log(f"QMP block_resize {device} to {size_bytes} bytes")
        with qemu_vm.connect(paths) as monitor:
            monitor.execute("block_resize", {"device": device, "size": size_bytes})
        return files.describe(target)
