"""A full clone onto another host: two tasks over the transfer channel, as a disk copy.

The source task (`clone_out`) holds the source VM's lock for the whole copy, so the
chains it serves cannot change under it (no start, revert or delete meanwhile), and
serves each disk's chain flattened (qemu-nbd over the pinned chain, the same
``image`` export as `workers.tasks.transfer.serve`, TLS when configured), one disk
at a time: either a snapshot's layers or what the VM runs on now.  The destination
task (`clone_in`, the one the producer follows) pulls each into
``vms/<clone>/disks/`` on its host (qemu-img convert from NBD into a new qcow2),
then creates the clone's record there atomically (`vm_create.lua`), with the
source's configuration, its own MAC, no port forwards (and so its own VNC display,
which a host assigns at start).

A cancel or failure of either side before the record exists removes the clone's
folder on the destination (the source wrote nothing); ``vms/<clone>/clone.json``
marks a clone under way there as for a local clone, so a destination worker killed
mid-way leaves nothing after its restart (`clones.remove_unfinished_clones`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

from api.enums import VMVMState as S
from api.errors import InvalidStateError
from api.protocol import hresults, keys, tasks
from api.protocol import transfer as xfer
from api.scripts import Scripts
from api.vmargs import to_args
from api.vms import VM_NAME_PATTERN
from workers.engines import nbd, transfer_tls
from workers.engines.context import raise_if_cancelled, scaled
from workers.engines.files import HostFiles
from workers.engines.storage import free_space
from workers.failures import DiskError, IllegalValue, OperationFailed
from workers.runtime import TaskRun, operation
from workers.tasks.clones import JOURNAL, record_fields, remove_clone, source_tops
from workers.tasks.migration import wait_manifest
from workers.tasks.snapshots import check_snapshot_name
from workers.tasks.transfer import (
    PeerWatch,
    Served,
    offer_fields,
    open_served,
    publish,
    pull_and_judge,
)
from workers.tasks.vms import begin, paths_of, vm_lock

WATCH = 0.1
# The present of a running source changes under a byte copy: it would need QEMU's
# own copy (a local clone's), which does not cross hosts yet.  A snapshot's layers
# do not change while the VM runs.
RUNNING_PRESENT = ("VM {name!r} is {state}: a clone of its present onto another host is "
                   "not supported yet (clone it at a snapshot, or turn it off first)")


def offer_key(transfer_id: str, index: int) -> str:
    return keys.transfer(f"{transfer_id}.{index}")


@operation(tasks.VM_CLONE_OUT)
def clone_out(run: TaskRun, name: str, snapshot: str | None, destination_host: str,
              transfer_id: str, client_task_id: str) -> dict[str, Any]:
    if snapshot is not None:
        check_snapshot_name(snapshot)
    files = HostFiles.of(run.settings)
    client = run.redis
    client_over = PeerWatch.of(run, client_task_id, destination_host).over
    with vm_lock(run, name):
        _, record, state = begin(run, name, None)
        if snapshot is None and state in (S.Running, S.Paused):
            raise InvalidStateError(RUNNING_PRESENT.format(name=name, state=state.name))
        tops = source_tops(run, record, snapshot)
        served = 0
        try:
            with ExitStack() as stack:
                exports = [open_served(files, top, "image", stack) for top in tops]
                manifest = [{"stem": top.stem, "virtual_size": e.virtual_size,
                             "allocated": e.allocated} for top, e in zip(tops, exports,
                                                                         strict=True)]
                publish(run, keys.transfer(transfer_id), {xfer.MANIFEST: json.dumps(manifest)},
                        "announcing the clone")
                for index, export in enumerate(exports):
                    if client_over() or not _serve_one(run, export, transfer_id, index,
                                                       client_over):
                        break
                    served += 1
        finally:
            run.ride_out(partial(client.delete, keys.transfer(transfer_id)),
                         "removing the clone's hash")
    return {"served": served}


def _serve_one(run: TaskRun, served: Served, transfer_id: str, index: int,
               client_over: Callable[[], bool]) -> bool:
    """Export one chain until the destination has pulled it (True) or is over."""
    client = run.redis
    with ExitStack() as stack:
        export = stack.enter_context(nbd.serve(
            served.spec, address=run.settings.advertise_address,
            ports=run.settings.transfer_ports, name=nbd.new_export_name(),
            pass_fds=served.fds, creds=transfer_tls.creds_of(run.settings)))
        run.log(f"serving disk {index} read-only with qemu-nbd on {export.address}:"
                f"{export.port}" + (f" (TLS: tls-creds-{export.creds.kind})"
                                    if export.creds is not None else " (no TLS)"))
        key = offer_key(transfer_id, index)
        stack.callback(run.ride_out, partial(client.delete, key), "withdrawing an export")
        publish(run, key, {**offer_fields(export), "virtual_size": served.virtual_size,
                           "allocated": served.allocated, "fixed": 0,
                           "host": run.settings.host}, "announcing an export")
        while run.ride_out(partial(client.hget, keys.transfer(transfer_id), xfer.done(index)),
                           "waiting for the destination's pull") != "1":
            if not export.alive():
                raise OperationFailed("qemu-nbd stopped serving the image")
            if client_over():
                return False
            run.sleep(WATCH)
    return True


@operation(tasks.VM_CLONE_IN)
def clone_in(run: TaskRun, name: str, clone: str, snapshot: str | None, source_host: str,
             transfer_id: str, server_task_id: str) -> dict[str, Any]:
    if not isinstance(clone, str) or not VM_NAME_PATTERN.fullmatch(clone):
        raise IllegalValue(f"Invalid VM name {clone!r}")
    files = HostFiles.of(run.settings)
    client = run.redis
    record: dict[str, str] = run.ride_out(lambda: client.hgetall(keys.vm_record(name)),
                                          "reading the source's record")
    if not record or record.get("host") != source_host:
        raise IllegalValue(f"VM {name!r} is not on host {source_host}")
    if run.ride_out(lambda: client.exists(keys.vm_record(clone)), "reading the clone's name"):
        raise IllegalValue(f"A VM named {clone!r} already exists")
    directory = paths_of(run.settings, clone).directory
    target = directory / "disks"
    if target.exists() or (directory / JOURNAL).exists():
        raise DiskError(f"{files.relative(target)} already exists on {run.settings.host}",
                        hresults.FILE_EXISTS)
    target.mkdir(parents=True)
    (directory / JOURNAL).write_text(json.dumps({"task": run.task_id, "source": name,
                                                 "source_host": source_host}))
    server = PeerWatch.of(run, server_task_id, source_host)
    try:
        manifest = wait_manifest(run, transfer_id, server, "clone")
        needed = sum(int(item["allocated"]) for item in manifest)
        if free_space(target) < needed:
            raise DiskError(f"Host {run.settings.host} has too little space for the clone "
                            f"{clone!r} ({needed} bytes)", hresults.DISK_FULL)
        disks = _pull_disks(run, manifest, target, transfer_id, source_host, server_task_id,
                            server)
        raise_if_cancelled(run)
        fields = record_fields(run, record, clone, disks)
        created = run.ride_out(lambda: Scripts.of(client).vm_create(
            record=keys.vm_record(clone), names=keys.VM_NAMES,
            host_vms=keys.host_vms(run.settings.host), name=clone, fields=to_args(fields)),
            "creating the clone's record")
        if not created:
            raise InvalidStateError(f"A VM named {clone!r} was created meanwhile")
    except BaseException:
        remove_clone(directory)
        raise
    os.unlink(directory / JOURNAL)
    return {"name": clone, "source": name, "linked": False, "snapshot": snapshot,
            "host": run.settings.host, "disks": json.loads(fields["disks"]),
            "mac": fields["mac"]}


def _pull_disks(run: TaskRun, manifest: list[dict[str, Any]], target: Path, transfer_id: str,
                source_host: str, server_task_id: str, server: PeerWatch) -> list[Path]:
    total = max(1, sum(int(item["virtual_size"]) for item in manifest))
    done = 0
    disks: list[Path] = []
    for index, item in enumerate(manifest):
        while not (offer := run.ride_out(partial(run.redis.hgetall,
                                                 offer_key(transfer_id, index)),
                                         "waiting for the source's export")):
            server.check("source", gave_up="stopped the clone")
            run.sleep(WATCH)
        size = int(item["virtual_size"])
        share = scaled(run, 99 * done / total, 99 * (done + size) / total)
        destination = target / f"{index}-{Path(str(item['stem'])).name}.qcow2"
        pull_and_judge(run, share, offer, destination, verbatim=False,
                       source_host=source_host, server_task_id=server_task_id)
        disks.append(destination)
        done += size
        run.ride_out(partial(run.redis.hset, keys.transfer(transfer_id), xfer.done(index), "1"),
                     "telling the source a disk arrived")
    return disks
