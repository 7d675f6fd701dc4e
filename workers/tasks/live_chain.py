"""Backing chains in a live migration: a disk arrives as the chain it is, not flattened.

A disk of a running VM may be the top of a chain: an undo disk (the VM's qcow2
overlay in ``vms/<name>/undo/``, over the disk the record names) or a differencing
disk over its parent.  The guest writes only the top image; every image below it is
open read-only and does not change while the VM runs.  So:

1. The source lists each disk's top image and the images below it (`manifest`).
2. Once the destination has accepted the migration (its refusals come first), the
   source serves each image below a top byte for byte over NBD (``qemu-nbd``
   read-only, as a cold migration does: `workers.tasks.transfer`), and the destination
   pulls each to the same path in its root (`pull_below`): the same bytes, the same
   backing names inside them.
3. The destination creates each top image empty over its copied parent (the backing
   file named relative to the top, as the project stores it; `create_top`), starts
   its QEMU on those chains, and the source mirrors only the top images
   (``sync: top``) before the usual migration.

The transfer hash carries ``chain`` (the images below, bottom first), ``accepted``
(destination), ``chain_offers`` (source: one export per image, in ``chain``'s
order) and ``chain_done`` (destination: the share pulled so far, for the source's
progress).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from api.protocol import hresults
from api.protocol import transfer as xfer
from workers.engines import nbd, qemu_vm, transfer_tls
from workers.engines.beneath import open_beneath, proc_path
from workers.engines.files import HostFiles
from workers.engines.qemu_vm import livemigrate
from workers.failures import Cancelled, DiskError, IllegalValue
from workers.outage import REDIS_AWAY
from workers.runtime import TaskRun
from workers.tasks.transfer import offer_fields, pull_and_judge

Signal = Callable[[dict[str, str]], None]


def manifest(monitor: qemu_vm.Monitor, files: HostFiles, config: qemu_vm.VMConfig
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(each disk's top image as QEMU runs it, every image below a top, bottom first).

    A top's sizes come from query-block (QEMU has it open for writing); an image below
    is read-only while the VM runs, so its file is what the destination gets.
    """
    images = {str(b.get("device")): b.get("inserted", {}).get("image", {})
              for b in monitor.execute("query-block")}
    disks: list[dict[str, Any]] = []
    below: list[dict[str, Any]] = []
    for index, path in enumerate(config.disks):
        image = images.get(livemigrate.device_of(index), {})
        with ExitStack() as stack:
            chain = files.open_chain(Path(path), stack)
        top, *lower = chain.links
        if lower and (chain.tail is not None or any(link.extra_fds for link in chain.links)):
            raise IllegalValue(f"{files.relative(top.real)} is over a host drive: "
                               "it moves only cold (turn the VM off first)")
        disks.append({"path": files.relative(top.real), "format": qemu_vm.disk_format(path),
                      "virtual_size": int(image.get("virtual-size", 0)),
                      "allocated": int(image.get("actual-size", 0)),
                      "backing": files.relative(lower[0].real) if lower else None})
        for link in reversed(lower):  # bottom first: a parent before its children
            relative = files.relative(link.real)
            if all(item["path"] != relative for item in below):
                size = os.stat(link.real)
                below.append({"path": relative, "format": qemu_vm.disk_format(link.real),
                              "size": size.st_size, "allocated": size.st_blocks * 512})
    return disks, below


def syncs(disks: list[dict[str, Any]]) -> tuple[str, ...]:
    """Each disk's mirror mode: its top only when the destination has what is below."""
    return tuple("top" if disk.get("backing") else "full" for disk in disks)


def serve_below(run: TaskRun, files: HostFiles, below: list[dict[str, Any]],
                stack: ExitStack) -> list[dict[str, Any]]:
    """Export each image below a top, read-only and byte for byte, until ``stack``
    closes; the offers, in ``below``'s order."""
    creds = transfer_tls.creds_of(run.settings)
    offers: list[dict[str, Any]] = []
    for item in below:
        path = files.resolve(item["path"], must_exist=True)
        fd = open_beneath(files.root, path)
        stack.callback(os.close, fd)
        stack.enter_context(files.file_locks([path], []))
        export = stack.enter_context(nbd.serve(
            nbd.file_spec(proc_path(fd)), address=run.settings.advertise_address,
            ports=run.settings.transfer_ports, name=nbd.new_export_name(), pass_fds=(fd,),
            creds=creds))
        offers.append({**offer_fields(export), xfer.VIRTUAL_SIZE: item["size"],
                       xfer.ALLOCATED: item["allocated"], xfer.FIXED: 0})
    return offers


def await_incoming(run: TaskRun, files: HostFiles, key: str, below: list[dict[str, Any]],
                   outgoing: livemigrate.Outgoing, signal: Signal,
                   between: Callable[[], None]) -> str:
    """The source until the destination is ready (its ``incoming``): serve the images
    below the tops once it has accepted, report its pull, ``between`` each look
    (the peer's fate, a cancel, the nap until the next signal)."""
    outgoing.below_bytes = sum(int(item["size"]) for item in below)
    with ExitStack() as stack:
        serving = not below
        while True:
            raw, accepted, done = run.ride_out(
                lambda: run.redis.hmget(key, xfer.INCOMING, xfer.ACCEPTED, xfer.CHAIN_DONE),
                "waiting for the destination")
            if raw:
                return str(raw)
            if not serving and accepted == "1":
                signal({xfer.CHAIN_OFFERS: json.dumps(serve_below(run, files, below, stack))})
                serving = True
            if done:
                outgoing.copied_below(float(done))
            between()


class _PullShare:
    """A pull's progress as its share of every image below, published for the source;
    a cancel is the destination's own or the source's giving up."""

    def __init__(self, run: TaskRun, key: str, low: float, high: float,
                 total: float) -> None:
        self.task_id = run.task_id
        self._run, self._key = run, key
        self._low, self._high, self._total = low, high, max(1.0, total)
        self._published = -1.0

    def report_progress(self, percent: float) -> None:
        share = (self._low + (self._high - self._low) * percent / 100) / self._total
        if share - self._published >= 0.01 or percent >= 100:
            self._published = share
            try:
                self._run.redis.hset(self._key, xfer.CHAIN_DONE, f"{share:.4f}")
            except REDIS_AWAY:
                return  # advisory, as the task's own progress; the next share says more

    def cancel_requested(self) -> bool:
        if self._run.cancel_requested():
            return True
        try:
            return bool(self._run.redis.hget(self._key, xfer.ABORT) == "1")
        except REDIS_AWAY:
            return False  # the abort is durable: seen once Redis is back

    def log(self, line: str) -> None:
        self._run.log(line)


def pull_below(run: TaskRun, files: HostFiles, key: str, below: list[dict[str, Any]],
               source_host: str, peer_task_id: str, signal: Signal,
               wait: Callable[[], None], made: list[Path]) -> None:
    """The destination: accept, then pull each image below a top to its path here
    (all or nothing each; what is published is appended to ``made``)."""
    if not below:
        return
    signal({xfer.ACCEPTED: "1"})
    while not (raw := run.ride_out(lambda: run.redis.hget(key, xfer.CHAIN_OFFERS),
                                   "waiting for the source's exports")):
        wait()
    offers: list[dict[str, str]] = [{k: str(v) for k, v in offer.items()}
                                    for offer in json.loads(raw)]
    total = sum(int(item["size"]) for item in below)
    done = 0
    for item, offer in zip(below, offers, strict=True):
        target = files.resolve_output(item["path"])
        share = _PullShare(run, key, done, done + int(item["size"]), total)
        try:
            pull_and_judge(run, share, offer, target, verbatim=True,
                           source_host=source_host, server_task_id=peer_task_id)
        except Cancelled:
            if run.ride_out(lambda: run.redis.hget(key, xfer.ABORT), "reading the abort") == "1":
                raise Cancelled(f"The source host {source_host} gave up the migration"
                                ) from None
            raise
        made.append(target)
        done += int(item["size"])


def create_top(files: HostFiles, item: dict[str, Any], target: Path,
               below: list[dict[str, Any]]) -> list[str]:
    """``qemu-img create`` arguments of a disk's empty top image: over its copied parent
    when it has one, the parent named relative to the top (as `create_differencing`
    stores it), never opened (``-u``)."""
    args = ["-f", item["format"], str(target), str(int(item["virtual_size"]))]
    parent = item.get("backing")
    if not parent:
        return args
    formats = {entry["path"]: entry["format"] for entry in below}
    if parent not in formats or item["format"] != "qcow2":
        raise DiskError(f"The parent {parent} of {item['path']} is not among the images "
                        "the source sent", hresults.DISK_CORRUPT)
    backing = os.path.relpath(files.resolve(parent), target.parent)
    return ["-u", "-b", backing, "-F", formats[parent], *args]
