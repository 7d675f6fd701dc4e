"""A running VM's disks and RAM at one point: external overlays over QMP.

The order is libvirt's (``qemu_snapshot.c``, ``qemuSnapshotCreateActiveExternal``):
the new overlays are opened first (``blockdev-add`` of files we created and hand
over by descriptor, ``add-fd``), so the guest does not wait for them; then, with
memory, the CPUs stop, the RAM and devices are migrated into a file (as `save`
does), the disks switch onto the overlays in one QMP ``transaction`` of
``blockdev-snapshot`` actions, and the CPUs run again.  Without memory the guest
keeps running: its file systems are frozen through its agent around the switch
(and always thawed).  The switch is the point of no return: until it, a cancel or
a failure leaves QEMU on its old top (the nodes added are deleted again); after
it, only `unswitch` (an active commit of the new, still nearly empty overlays) goes
back.

Block jobs (`run_job`): ``block-stream`` and ``block-commit`` with progress from
``query-jobs``, cancelable until the caller's ``before_complete`` hook, which runs
just before an active commit's ``job-complete`` (its final switch).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.engines.context import OperationContext, ProgressSpan, raise_if_cancelled
from workers.engines.guest_agent import GuestAgentClient
from workers.engines.qemu_vm.config import VMConfig
from workers.engines.qemu_vm.monitor import Monitor
from workers.engines.qemu_vm.process import POLL_INTERVAL
from workers.engines.qemu_vm.savestate import UNLIMITED_BANDWIDTH, _cancel_migration
from workers.engines.qemu_vm.statefile import STATE_FD_NAME, publish_state_file
from workers.failures import Cancelled, OperationFailed, OperationTimedOut, QMPCommandFailed

SNAPSHOT_TIMEOUT = 1800.0
AGENT_TIMEOUT = 10.0
# The guest stands still while its RAM is written: its end is looked for often
# (a save's 50 ms poll would add up to 50 ms to every pause).
MIGRATION_POLL = 0.005


def device_of(index: int) -> str:
    return f"disk{index}"


def node_name(layer: str, index: int) -> str:
    """The node QEMU knows an overlay of ours by: found again after a worker's crash."""
    return f"vmtask-{layer}-{index}"


def disk_tops(monitor: Monitor, count: int) -> list[str]:
    """The node each disk's guest device writes (the top of its chain)."""
    tops = {str(b.get("device")): b.get("inserted", {}).get("node-name")
            for b in monitor.execute("query-block")}
    found = [tops.get(device_of(i)) for i in range(count)]
    if not all(found):
        raise OperationFailed(f"QEMU does not show the VM's {count} disks: {tops}")
    return [str(n) for n in found]


def node_names(monitor: Monitor) -> set[str]:
    return {str(n["node-name"]) for n in monitor.execute("query-named-block-nodes")}


def _filename(entry: dict[str, Any]) -> str:
    """A format node's file name, also when QEMU shows its options as ``json:``."""
    name = str(entry.get("file", ""))
    if name.startswith("json:"):
        with contextlib.suppress(ValueError, AttributeError):
            inner = json.loads(name[5:]).get("file")
            return str(inner.get("filename") if isinstance(inner, dict) else inner)
    return name


class _Resolver:
    """QEMU names our files by descriptor (``/proc/self/fd/N`` of a start,
    ``/dev/fdset/N`` of an overlay added live): each is followed through QEMU's own
    descriptor table to the real path."""

    def __init__(self, monitor: Monitor, pid: int) -> None:
        self._pid = pid
        self._fdsets = {f"/dev/fdset/{s['fdset-id']}": s["fds"][0]["fd"]
                        for s in monitor.execute("query-fdsets") if s.get("fds")}

    def real(self, name: str) -> str:
        fd = self._fdsets.get(name)
        if fd is None and name.startswith("/proc/self/fd/"):
            fd = int(name.rsplit("/", 1)[1])
        if fd is not None:
            with contextlib.suppress(OSError):
                name = os.readlink(f"/proc/{self._pid}/fd/{fd}")
        return os.path.realpath(name)


def nodes_by_file(monitor: Monitor, pid: int) -> dict[str, str]:
    """{real path of an image: its format node}."""
    resolver = _Resolver(monitor, pid)
    found: dict[str, str] = {}
    for entry in monitor.execute("query-named-block-nodes"):
        if entry.get("drv") in ("file", "host_device"):
            continue
        found.setdefault(resolver.real(_filename(entry)), str(entry["node-name"]))
    return found


def chain_files(monitor: Monitor, pid: int, index: int) -> list[str]:
    """The real paths of disk ``index``'s chain as QEMU runs it, top first: one QMP
    call, where reading each image's header would take a qemu-img each."""
    resolver = _Resolver(monitor, pid)
    blocks = {str(b.get("device")): b for b in monitor.execute("query-block")}
    image = blocks.get(device_of(index), {}).get("inserted", {}).get("image")
    chain: list[str] = []
    while image:
        chain.append(resolver.real(_filename({"file": image.get("filename", "")})))
        image = image.get("backing-image")
    return chain


def add_overlay(monitor: Monitor, path: Path, node: str) -> None:
    """Open ``path`` (a qcow2 we created over the node it will cover) as ``node``,
    without its backing: ``blockdev-snapshot`` attaches the old top below it."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fdset = monitor.add_fd(fd)
    finally:
        os.close(fd)
    monitor.execute("blockdev-add", {
        "driver": "qcow2", "node-name": node, "backing": None,
        "file": {"driver": "file", "filename": f"/dev/fdset/{fdset}"}})


def drop_nodes(monitor: Monitor, nodes: list[str]) -> None:
    """Close nodes that were added but never switched to (quietly: best effort)."""
    present = node_names(monitor)
    for node in reversed(nodes):
        if node in present:
            with contextlib.suppress(OperationFailed):
                monitor.execute("blockdev-del", {"node-name": node})


def release_unused(monitor: Monitor) -> None:
    """Close our nodes that left the disks' chains (a stream or a commit drops them
    from the graph, but the monitor's reference from ``blockdev-add`` keeps them open,
    and with them a claim on the node below, which then refuses a new snapshot).
    QEMU refuses to delete a node still in use: those stay."""
    while True:
        ours = [n for n in node_names(monitor) if n.startswith("vmtask-")]
        released = 0
        for node in ours:
            try:
                monitor.execute("blockdev-del", {"node-name": node})
                released += 1
            except QMPCommandFailed:
                continue
        if not released:
            return


def switch(monitor: Monitor, pairs: list[tuple[str, str]]) -> None:
    """Every disk onto its overlay at one instant: (node, overlay) actions, in order,
    in one transaction (all or none)."""
    monitor.execute("transaction", {"actions": [
        {"type": "blockdev-snapshot", "data": {"node": node, "overlay": overlay}}
        for node, overlay in pairs]})


@dataclass
class Captured:
    paused_ms: int
    frozen_ms: int
    frozen: bool


def _freeze(agent: Path | None, context: OperationContext) -> GuestAgentClient | None:
    """Freeze the guest's file systems; None (crash-consistent) when there is no agent
    or it does not answer, which is logged."""
    if agent is None:
        return None
    client = GuestAgentClient(agent)
    try:
        count = client.execute("guest-fsfreeze-freeze", timeout=AGENT_TIMEOUT)
        context.log(f"guest-fsfreeze-freeze: {count} file systems frozen")
        return client
    except OperationFailed as exc:
        context.log(f"guest-fsfreeze-freeze failed ({exc}): crash-consistent")
        _thaw(client, context)
        client.close()
        return None


def _thaw(client: GuestAgentClient, context: OperationContext) -> None:
    try:
        client.execute("guest-fsfreeze-thaw", timeout=AGENT_TIMEOUT)
        context.log("guest-fsfreeze-thaw")
    except OperationFailed as exc:
        # qemu-ga thaws by itself when its client goes; say so rather than fail.
        context.log(f"guest-fsfreeze-thaw failed: {exc}")


def capture(monitor: Monitor, config: VMConfig, stacks: list[list[tuple[Path, str]]],
            context: OperationContext, *, state: tuple[Path, Path] | None,
            agent: Path | None, before_switch: Callable[[], None],
            timeout: float = SNAPSHOT_TIMEOUT) -> Captured:
    """Switch the running VM's disks onto new overlays: per disk, (file, node) pairs
    bottom first, each file a new qcow2 over the one before it (the first over the
    disk's current top); with its RAM into ``state`` ((temporary, final) paths) when
    given.  ``before_switch`` runs just before the transaction (a cancel raised there
    still leaves no trace)."""
    deadline = time.monotonic() + timeout
    progress = ProgressSpan(context, 0, 90, min_step=0.5)
    status = str(monitor.execute("query-status")["status"])
    if status not in ("running", "paused"):
        raise OperationFailed(f"VM {config.name} is {status!r}: no snapshot now")
    tops = disk_tops(monitor, len(stacks))
    added: list[str] = []
    pairs: list[tuple[str, str]] = []
    switched = False
    try:
        for top, stack in zip(tops, stacks, strict=True):
            below = top
            for path, node in stack:
                add_overlay(monitor, path, node)
                added.append(node)
                pairs.append((below, node))
                below = node
        news = [stack[-1][1] for stack in stacks]
        progress.step(5)
        raise_if_cancelled(context)
        if state is None:
            frozen = _freeze(agent, context)
            start = time.monotonic()
            try:
                before_switch()
                context.log("QMP transaction: blockdev-snapshot of every disk")
                switch(monitor, pairs)
                switched = True
            finally:
                frozen_ms = round((time.monotonic() - start) * 1000)
                if frozen is not None:
                    _thaw(frozen, context)
                    frozen.close()
            progress.step(100)
            return Captured(paused_ms=0, frozen_ms=frozen_ms if frozen else 0,
                            frozen=frozen is not None)
        tmp, final = state
        machine = str(monitor.execute("qom-get", {"path": "/machine", "property": "type"}))
        version = monitor.execute("query-version")["qemu"]
        monitor.execute("migrate-set-parameters", {"max-bandwidth": UNLIMITED_BANDWIDTH})
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        stopped = 0.0
        try:
            stopped = time.monotonic()
            if status == "running":
                monitor.execute("stop")
            try:
                monitor.send_fd(STATE_FD_NAME, fd)
                context.log(f"QMP migrate to {tmp.name}")
                monitor.execute("migrate", {"uri": f"fd:{STATE_FD_NAME}"})
                _follow(monitor, context, progress, deadline)
                os.fsync(fd)
                before_switch()
                context.log("QMP transaction: blockdev-snapshot of every disk")
                switch(monitor, pairs)
                switched = True
            except BaseException:
                if not switched:
                    with contextlib.suppress(OperationFailed):
                        _cancel_migration(monitor, time.monotonic() + 30)
                raise
            finally:
                if status == "running":
                    monitor.execute("cont")  # takes the disks back after a migration
                paused_ms = round((time.monotonic() - stopped) * 1000)
        finally:
            os.close(fd)
        context.log(f"the guest stood still {paused_ms} ms")
        publish_state_file(tmp, final, config, machine_type=machine, qemu_version=version,
                           run_state=status)
        progress.step(100)
        return Captured(paused_ms=paused_ms, frozen_ms=0, frozen=False)
    except BaseException:
        if state is not None:
            state[0].unlink(missing_ok=True)
        if switched:
            with contextlib.suppress(OperationFailed):
                unswitch(monitor, tops, news, context)
                drop_nodes(monitor, added)
        else:
            with contextlib.suppress(OperationFailed):
                drop_nodes(monitor, added)
        raise


def _follow(monitor: Monitor, context: OperationContext, progress: ProgressSpan,
            deadline: float) -> None:
    """Until the RAM is in the file; a cancel cancels the migration (`Cancelled`)."""
    while True:
        info = monitor.execute("query-migrate")
        state = info.get("status")
        ram = info.get("ram") or {}
        if ram.get("total"):
            progress.span(10, 90, 1 - ram.get("remaining", 0) / ram["total"])
        if state == "completed":
            context.log(f"QMP query-migrate: completed, {ram.get('transferred', 0)} bytes")
            return
        if state in ("failed", "cancelled"):
            raise OperationFailed(f"Writing the RAM failed: {info.get('error-desc', state)}")
        if context.cancel_requested():
            _cancel_migration(monitor, time.monotonic() + 30)
            raise Cancelled()
        if time.monotonic() > deadline:
            raise OperationTimedOut("Writing the RAM took too long")
        time.sleep(MIGRATION_POLL)


def unswitch(monitor: Monitor, tops: list[str], overlays: list[str],
             context: OperationContext) -> None:
    """Back onto the old tops: commit each disk's new overlays (what the guest wrote
    since the switch) into its old top and pivot there."""
    for index, (top, overlay) in enumerate(zip(tops, overlays, strict=True)):
        job = f"vmtask-undo-{index}"
        monitor.execute("block-commit", {"job-id": job, "device": device_of(index),
                                         "top-node": overlay, "base-node": top,
                                         "auto-dismiss": False})
        run_job(monitor, job, _Quiet(context), lambda: None, SNAPSHOT_TIMEOUT)


class _Quiet:
    """A context that never cancels: an undo must finish."""

    def __init__(self, context: OperationContext) -> None:
        self.task_id = context.task_id
        self._context = context

    def report_progress(self, percent: float) -> None:
        pass

    def cancel_requested(self) -> bool:
        return False

    def log(self, line: str) -> None:
        self._context.log(line)


def copy_out(monitor: Monitor, targets: list[Path], token: str,
             context: OperationContext, timeout: float = SNAPSHOT_TIMEOUT) -> None:
    """Copy what each disk reads now into ``targets`` (new empty qcow2s of its size)
    while the guest runs: ``blockdev-backup`` (sync full) of every disk, started in
    one transaction, so the copies are of one instant (crash-consistent).  A cancel
    or a failure cancels every job; the caller removes the targets."""
    nodes = [f"vmtask-{token}-{i}" for i in range(len(targets))]
    jobs = [f"vmtask-copy-{token}-{i}" for i in range(len(targets))]
    added: list[str] = []
    started = False
    try:
        for path, node in zip(targets, nodes, strict=True):
            add_overlay(monitor, path, node)
            added.append(node)
        raise_if_cancelled(context)
        context.log("QMP transaction: blockdev-backup (sync full) of every disk")
        monitor.execute("transaction", {"actions": [
            {"type": "blockdev-backup", "data": {
                "job-id": job, "device": device_of(index), "target": node, "sync": "full",
                "auto-dismiss": False}}
            for index, (job, node) in enumerate(zip(jobs, nodes, strict=True))]})
        started = True
        for index, job in enumerate(jobs):
            run_job(monitor, job, context, lambda: None, timeout, ProgressSpan(
                context, 100 * index / len(jobs), 100 * (index + 1) / len(jobs),
                min_step=0.5))
    except BaseException:
        if started:
            deadline = time.monotonic() + 60
            for job in jobs:
                with contextlib.suppress(OperationFailed):
                    if job_of(monitor, job) is not None:
                        _cancel_job(monitor, job, deadline)
        raise
    finally:
        with contextlib.suppress(OperationFailed):
            drop_nodes(monitor, added)


def virtual_sizes(monitor: Monitor, count: int) -> list[int]:
    blocks = {str(b.get("device")): b for b in monitor.execute("query-block")}
    return [int(blocks[device_of(i)]["inserted"]["image"]["virtual-size"])
            for i in range(count)]


def settle_jobs(monitor: Monitor, context: OperationContext) -> None:
    """Our block jobs that a killed worker left in QEMU (it runs them on): a finished
    one is dismissed, another cancelled, which leaves every node reading as before
    (a stream's copy is what its node read anyway; an active commit not completed
    does not pivot).  Their ids would clash with the next job's."""
    deadline = time.monotonic() + SNAPSHOT_TIMEOUT
    for job in monitor.execute("query-jobs"):
        name = str(job.get("id", ""))
        if not name.startswith("vmtask-"):
            continue
        context.log(f"a dead worker's block job {name} is {job.get('status')}: settled")
        if job.get("status") == "concluded":
            monitor.execute("job-dismiss", {"id": name})
        else:
            _cancel_job(monitor, name, deadline)


def job_of(monitor: Monitor, job: str) -> dict[str, Any] | None:
    return next((j for j in monitor.execute("query-jobs") if j.get("id") == job), None)


def run_job(monitor: Monitor, job: str, context: OperationContext,
            before_complete: Callable[[], None], timeout: float,
            progress: ProgressSpan | None = None) -> None:
    """Follow a block job to its end, dismissed.  A cancel before ``ready`` (or, for a
    job that gets ready, before ``before_complete`` returns) cancels the job and
    raises `Cancelled`: a stream or a commit cancelled leaves every node reading
    what it read.  ``before_complete`` then ``job-complete`` pivot a ready job."""
    deadline = time.monotonic() + timeout
    seen = None
    completing = False
    while True:
        info = job_of(monitor, job)
        if info is None:
            raise OperationFailed(f"The block job {job} vanished")
        status = info.get("status")
        if status != seen:
            seen = status
            context.log(f"QMP query-jobs {job}: {status}")
        total = int(info.get("total-progress") or 0)
        if progress is not None and total:
            progress.span(0, 100, int(info.get("current-progress") or 0) / total)
        if status == "concluded":
            monitor.execute("job-dismiss", {"id": job})
            if info.get("error"):
                raise OperationFailed(f"The block job {job} failed: {info['error']}")
            if progress is not None:
                progress.step(100)
            return
        if status == "ready" and not completing:
            try:
                before_complete()
            except BaseException:
                _cancel_job(monitor, job, deadline)
                raise
            completing = True
            context.log(f"QMP job-complete {job}")
            monitor.execute("job-complete", {"id": job})
        elif not completing and context.cancel_requested():
            _cancel_job(monitor, job, deadline)
            raise Cancelled()
        if time.monotonic() > deadline:
            raise OperationTimedOut(f"The block job {job} took too long")
        time.sleep(POLL_INTERVAL / 5)


def _cancel_job(monitor: Monitor, job: str, deadline: float) -> None:
    with contextlib.suppress(QMPCommandFailed):
        monitor.execute("job-cancel", {"id": job})
    while (info := job_of(monitor, job)) is not None:
        if info.get("status") == "concluded":
            monitor.execute("job-dismiss", {"id": job})
            return
        if time.monotonic() > deadline:
            raise OperationTimedOut(f"The block job {job} did not stop after job-cancel")
        time.sleep(POLL_INTERVAL / 5)
