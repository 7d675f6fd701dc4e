"""Reading a point-in-time view of a VM's disks into a repository, over QMP.

One code path for every state.  A Running or Paused VM's own QEMU runs the job (the
guest keeps running); for a TurnedOff or Saved VM a ``qemu-storage-daemon`` opens
the disks (`storage_daemon`) and runs the same commands.  Why QEMU's backup job
rather than ``qemu-img``: qemu-img cannot read through a dirty bitmap, and the backup
job can, offline and online alike.  It inserts a copy-before-write filter on the
disk, so a guest write to a cluster not yet copied first pushes the old cluster to
the target: what lands in the target is the disk at the instant the job started.

Change tracking: one persistent dirty bitmap per disk and repository, named for the
backup it counts from (`bitmap_name`).  A backup starts, in one QMP ``transaction``
(so no write falls between them), a new empty bitmap named for itself and a
``blockdev-backup``: ``sync: full``, or ``sync: bitmap`` with the parent's bitmap and
``bitmap-mode: never``, so that the job never touches the parent's bitmap.  The
parent's bitmap is removed only after the repository's index names the new backup;
until then a failed, cancelled or killed backup leaves the parent's bitmap whole and
the next one is still incremental against the last good backup.  QEMU writes
persistent bitmaps into the qcow2 when it closes the image (a clean quit); a QEMU
killed with the bitmap open leaves it marked in use, which QEMU 7.2 reports as
``inconsistent`` and which makes the next backup full (`chain_problem`).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.engines.context import OperationContext, ProgressSpan
from workers.engines.qemu_img.runner import run_qemu_img
from workers.engines.qemu_vm.config import VMPaths
from workers.engines.qemu_vm.monitor import Monitor
from workers.failures import Cancelled, OperationFailed, QMPCommandFailed, VMNotRunning

BITMAP_PREFIX = "vmtask-backup-"
JOB_PREFIX = "vmtask-backup-job"
TARGET_PREFIX = "vmtask-backup-target"
POLL = 0.1
DAEMON_START_TIMEOUT = 15.0


def bitmap_prefix(repository_id: str) -> str:
    return f"{BITMAP_PREFIX}{repository_id[:12]}-"


def bitmap_name(repository_id: str, backup_id: str) -> str:
    """The bitmap that counts the writes since backup ``backup_id`` of that repository."""
    return bitmap_prefix(repository_id) + backup_id


def device_of(index: int) -> str:
    """Disk ``index``'s block device: the VM's drive id, and the daemon's node name."""
    return f"disk{index}"


@dataclass(frozen=True)
class DiskJob:
    index: int
    target: Path
    sync: str
    """"full" or "bitmap"."""
    since: str | None
    """The parent's bitmap (sync "bitmap")."""
    new_bitmap: str


def disk_nodes(monitor: Monitor, count: int) -> list[dict[str, Any]]:
    """Each disk's top block node as QEMU describes it (``image``, ``dirty-bitmaps``):
    a VM's drives are devices, the storage daemon's are named nodes."""
    found: list[dict[str, Any]] = [{} for _ in range(count)]
    for device in monitor.execute("query-block"):
        for index in range(count):
            if device.get("device") == device_of(index) and device.get("inserted"):
                found[index] = device["inserted"]
    if not all(found):
        for node in monitor.execute("query-named-block-nodes", {"flat": True}):
            for index in range(count):
                if not found[index] and node.get("node-name") == device_of(index):
                    found[index] = node
    missing = [device_of(i) for i, node in enumerate(found) if not node]
    if missing:
        raise OperationFailed(f"QEMU has no drive {', '.join(missing)}")
    return found


def virtual_sizes(monitor: Monitor, count: int) -> list[int]:
    return [int(node["image"]["virtual-size"]) for node in disk_nodes(monitor, count)]


def bitmaps(monitor: Monitor, count: int) -> list[dict[str, dict[str, Any]]]:
    """Each disk's dirty bitmaps by name, as QEMU sees them (``inconsistent``...)."""
    return [{str(b["name"]): b for b in node.get("dirty-bitmaps", [])}
            for node in disk_nodes(monitor, count)]


def chain_problem(found: list[dict[str, dict[str, Any]]], wanted: str) -> str | None:
    """Why an incremental against bitmap ``wanted`` cannot be trusted, or None."""
    for index, named in enumerate(found):
        bitmap = named.get(wanted)
        if bitmap is None:
            return f"disk {index} has no dirty bitmap {wanted} (it was lost or the disk replaced)"
        if bitmap.get("inconsistent"):
            return (f"the dirty bitmap of disk {index} is inconsistent (QEMU stopped without "
                    "writing it back)")
        if not bitmap.get("persistent", False):
            return f"the dirty bitmap of disk {index} is not persistent"
    return None


def remove_bitmaps(monitor: Monitor, count: int, prefix: str, keep: str | None) -> list[str]:
    """Remove this repository's bitmaps other than ``keep`` from every disk."""
    removed: list[str] = []
    for index, named in enumerate(bitmaps(monitor, count)):
        for name in named:
            if name.startswith(prefix) and name != keep:
                monitor.execute("block-dirty-bitmap-remove",
                                {"node": device_of(index), "name": name})
                removed.append(f"disk{index}:{name}")
    return removed


def clear_stale_jobs(monitor: Monitor) -> None:
    """A backup of a running VM whose worker died may have left its job and target
    nodes in QEMU: cancel and drop them before their folder is removed."""
    for job in monitor.execute("query-jobs"):
        if str(job["id"]).startswith(JOB_PREFIX):
            if job["status"] not in ("concluded", "null"):
                monitor.execute("job-cancel", {"id": job["id"]})
                _wait_concluded(monitor, [str(job["id"])])
            monitor.execute("job-dismiss", {"id": job["id"]})
    for node in monitor.execute("query-named-block-nodes", {"flat": True}):
        if str(node.get("node-name", "")).startswith(TARGET_PREFIX):
            monitor.execute("blockdev-del", {"node-name": node["node-name"]})


def _wait_concluded(monitor: Monitor, ids: Sequence[str], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        jobs = {str(j["id"]): j for j in monitor.execute("query-jobs")}
        if all(jobs.get(i, {}).get("status", "concluded") == "concluded" for i in ids):
            return
        time.sleep(POLL)
    raise OperationFailed("QEMU's backup jobs did not stop after a cancel")


def create_target(target: Path, size: int, backing: str | None,
                  context: OperationContext) -> None:
    args = ["create", "-q", "-f", "qcow2"]
    if backing is not None:
        # -u: the size is given, so qemu-img need not open the parent (nor follow
        # whatever name it stores): only the name is written into the header.
        args += ["-u", "-F", "qcow2", "-b", backing]
    run_qemu_img([*args, str(target), str(size)], context, progress_range=(0, 0))


def run_backup(monitor: Monitor, disks: Sequence[DiskJob], context: OperationContext,
               progress: ProgressSpan, speed: int = 0) -> int:
    """Copy every disk into its (already created) target; return the bytes read.

    Cancelable: the jobs are cancelled, the new bitmaps removed and the targets
    closed; the caller removes the files.  The targets are opened without their
    backing (the job writes only, and never reads the target).  ``speed``: bytes/s
    per disk, 0 for no limit."""
    jobs = [f"{JOB_PREFIX}{d.index}" for d in disks]
    nodes = [f"{TARGET_PREFIX}{d.index}" for d in disks]
    added: list[str] = []
    started = False
    try:
        for disk, node in zip(disks, nodes, strict=True):
            monitor.execute("blockdev-add", {
                "driver": "qcow2", "node-name": node, "backing": None,
                "file": {"driver": "file", "filename": str(disk.target)}})
            added.append(node)
        actions: list[dict[str, Any]] = []
        for disk, node, job in zip(disks, nodes, jobs, strict=True):
            actions.append({"type": "block-dirty-bitmap-add", "data": {
                "node": device_of(disk.index), "name": disk.new_bitmap, "persistent": True}})
            data: dict[str, Any] = {"job-id": job, "device": device_of(disk.index),
                                    "target": node, "sync": disk.sync, "auto-dismiss": False,
                                    "auto-finalize": True, "speed": speed}
            if disk.sync == "bitmap":
                data.update({"bitmap": disk.since, "bitmap-mode": "never"})
            actions.append({"type": "blockdev-backup", "data": data})
        began = time.monotonic()
        monitor.execute("transaction", {"actions": actions})
        started = True
        # The guest is never paused; its I/O is drained only while this transaction
        # runs (the copy-before-write filters go in): the stall it can see.
        context.log(f"backup jobs started in {(time.monotonic() - began) * 1000:.1f} ms "
                    f"(I/O drained meanwhile): "
                    f"{', '.join(f'disk{d.index} {d.sync}' for d in disks)}")
        total = _follow(monitor, jobs, context, progress)
        return total
    except BaseException:
        if started:
            for job in jobs:
                try:
                    monitor.execute("job-cancel", {"id": job})
                except QMPCommandFailed:
                    pass  # already concluded
            _wait_concluded(monitor, jobs)
            for disk in disks:
                try:
                    monitor.execute("block-dirty-bitmap-remove",
                                    {"node": device_of(disk.index), "name": disk.new_bitmap})
                except QMPCommandFailed:
                    pass
        raise
    finally:
        if started:
            for job in jobs:
                try:
                    monitor.execute("job-dismiss", {"id": job})
                except QMPCommandFailed:
                    pass
        for node in added:
            try:
                monitor.execute("blockdev-del", {"node-name": node})
            except Exception as exc:  # noqa: BLE001  QEMU gone: nothing left to close
                context.log(f"could not close {node}: {exc}")


def _follow(monitor: Monitor, jobs: Sequence[str], context: OperationContext,
            progress: ProgressSpan) -> int:
    """Poll the jobs until all conclude; progress is bytes copied of bytes to copy."""
    logged = 0.0
    while True:
        if context.cancel_requested():
            raise Cancelled()
        table = {str(j["id"]): j for j in monitor.execute("query-jobs")}
        mine = [table[j] for j in jobs if j in table]
        if len(mine) < len(jobs):
            raise OperationFailed("A backup job vanished from QEMU")
        done = sum(int(j.get("current-progress", 0)) for j in mine)
        total = sum(int(j.get("total-progress", 0)) for j in mine)
        progress.step(100.0 * done / total if total else 0.0)
        now = time.monotonic()
        if now - logged > 5:
            context.log(f"backup: {done} of {total} bytes")
            logged = now
        if all(j["status"] == "concluded" for j in mine):
            failed = [j for j in mine if j.get("error")]
            if failed:
                raise OperationFailed(f"The backup job failed: {failed[0]['error']}")
            context.log(f"backup: {total} bytes read")
            return total
        time.sleep(POLL)


class StorageDaemon:
    """``qemu-storage-daemon`` with a VM's disks open (read-write, for the bitmaps), as
    the drives ``disk<i>``, and a QMP monitor in ``folder``.  Each disk is a pinned
    chain (`workers.engines.qemu_img.pinned`): the daemon opens exactly the confined
    files.  Stops with a clean ``quit``, which writes the persistent bitmaps back."""

    def __init__(self, folder: Path, nodes: Sequence[dict[str, Any]], fds: Sequence[int]
                 ) -> None:
        self.paths = VMPaths(folder)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            os.unlink(self.paths.qmp_socket)
        except FileNotFoundError:
            pass
        # TERM, not KILL, on the worker's death: the daemon then quits cleanly and
        # writes the bitmaps back, so the parent's survives a killed backup.
        argv = ["setpriv", "--pdeathsig", "TERM", "--", "qemu-storage-daemon"]
        for index, node in enumerate(nodes):
            argv += ["--blockdev", json.dumps({**node, "node-name": device_of(index)})]
        argv += ["--chardev", f"socket,id=qmp,path={self.paths.qmp_socket},server=on,wait=off",
                 "--monitor", "chardev=qmp"]
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        pass_fds=tuple(fds), start_new_session=True)
        end = time.monotonic() + DAEMON_START_TIMEOUT
        while True:
            # The socket's file appears at bind(), a moment before listen(): a connect
            # in between is refused, so a refusal is retried while the daemon lives.
            if self.paths.qmp_socket.exists():
                try:
                    self.monitor = Monitor(self.paths)
                    return
                except VMNotRunning:
                    pass
            if self.process.poll() is not None or time.monotonic() > end:
                self.kill()
                raise OperationFailed(f"qemu-storage-daemon did not start: {self._stderr()}")
            time.sleep(0.02)

    def _stderr(self) -> str:
        assert self.process.stderr is not None
        try:
            return self.process.stderr.read().decode(errors="replace").strip()[-2000:]
        except (OSError, ValueError):
            return ""

    def stop(self) -> None:
        """Quit cleanly (bitmaps written back); killed if it does not within 30 s."""
        try:
            self.monitor.execute("quit")
        except Exception:  # noqa: BLE001  it may hang up before answering
            pass
        self.monitor.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
            raise OperationFailed("qemu-storage-daemon did not quit") from None
        if self.process.stderr is not None:
            self.process.stderr.close()
        try:
            os.unlink(self.paths.qmp_socket)
        except FileNotFoundError:
            pass

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()
