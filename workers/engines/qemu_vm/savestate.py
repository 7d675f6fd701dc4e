"""Saving a running VM: migrating it into a state file, then stopping its QEMU.

QEMU 7.2 has no ``file:`` migration URI and a shell ``exec:`` URI is not acceptable,
so the state file is opened here and its descriptor handed to QEMU over the QMP
socket (SCM_RIGHTS + ``getfd``) for ``migrate fd:``.  Only a complete, synced state
is published with its fingerprint file (`statefile`); until then the VM runs on.
"""

from __future__ import annotations

import contextlib
import os
import time

from api.protocol import hresults
from workers.engines.context import OperationContext, ProgressSpan
from workers.engines.qemu_vm.config import VMConfig, VMPaths, disk_format
from workers.engines.qemu_vm.monitor import TURN_OFF_GRACE, Monitor, connect
from workers.engines.qemu_vm.process import POLL_INTERVAL, cleanup, find_pid, force_stop, wait_pid
from workers.engines.qemu_vm.statefile import (
    STATE_FD_NAME,
    discard_saved_state,
    publish_saved_state,
)
from workers.failures import (
    Cancelled,
    DiskError,
    IllegalValue,
    OperationFailed,
    OperationTimedOut,
    VMNotRunning,
)

SAVE_TIMEOUT = 1800.0
# The destination is a local file, so QEMU's default 32 MiB/s migration cap would
# only slow saves down; 1 TiB/s is "no limit" in practice.
UNLIMITED_BANDWIDTH = 1 << 40
# QEMU registers a migration blocker for every node in these formats.
UNMIGRATABLE_FORMATS = frozenset({"vpc", "vhdx"})


def cancel_migration(monitor: Monitor, deadline: float) -> str | None:
    """Cancel a migration and return its final status ("completed" if it won the race)."""
    monitor.execute("migrate_cancel")
    # QEMU only lets go of the VM once the migration has really stopped.
    while (status := monitor.execute("query-migrate").get("status")) not in (
        "cancelled",
        "failed",
        "completed",
        None,
    ):
        if time.monotonic() > deadline:
            raise OperationTimedOut("The migration did not stop after migrate_cancel")
        time.sleep(POLL_INTERVAL / 5)
    return str(status) if status is not None else None


def save(
    config: VMConfig,
    paths: VMPaths,
    context: OperationContext,
    *,
    max_bandwidth: int | None = None,
    timeout: float = SAVE_TIMEOUT,
) -> None:
    """Save the running (or paused) VM to ``paths.state_file`` and stop its QEMU.

    Progress is the fraction of guest RAM processed.  Cancelling (or a failure before
    the state is complete) cancels the migration, lets the VM run on as before and
    leaves no state file.  ``max_bandwidth`` (bytes/s) limits the write rate.
    """
    deadline = time.monotonic() + timeout
    progress = ProgressSpan(context, min_step=0.5)
    progress.step(0)
    blocked = [disk for disk in config.disks if disk_format(disk) in UNMIGRATABLE_FORMATS]
    if blocked:
        raise IllegalValue(
            f"VM {config.name} cannot be saved: QEMU cannot save a VM with a VHD/VHDX disk "
            f"attached (migration blocker): {', '.join(blocked)}"
        )
    if context.cancel_requested():
        raise Cancelled()
    pid = find_pid(paths)
    if pid is None:
        raise VMNotRunning(f"VM {config.name} is not running")
    with connect(paths) as monitor:
        status = monitor.execute("query-status")["status"]
        if status not in ("running", "paused"):
            raise OperationFailed(f"VM {config.name} cannot be saved in the run state {status!r}")
        blockers = monitor.execute("query-migrate").get("blocked-reasons") or []
        if blockers:
            raise IllegalValue(f"VM {config.name} cannot be saved: {'; '.join(blockers)}")
        machine_type = str(monitor.execute("qom-get", {"path": "/machine", "property": "type"}))
        version = monitor.execute("query-version")["qemu"]
        monitor.execute(
            "migrate-set-parameters",
            {"max-bandwidth": max_bandwidth if max_bandwidth is not None else UNLIMITED_BANDWIDTH},
        )
        progress.step(2)
        paths.state_tmp.unlink(missing_ok=True)
        fd = os.open(paths.state_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        completed = False
        try:
            if status == "running":
                context.log("QMP stop: the guest was running")
                monitor.execute("stop")
            try:
                monitor.send_fd(STATE_FD_NAME, fd)
                context.log(f"QMP migrate to {paths.state_tmp.name} (max-bandwidth "
                            f"{'unlimited' if max_bandwidth is None else max_bandwidth})")
                monitor.execute("migrate", {"uri": f"fd:{STATE_FD_NAME}"})
                _follow_migration(monitor, context, progress, deadline)
                os.fsync(fd)
            except BaseException:
                context.log("QMP migrate_cancel" + ("; cont" if status == "running" else ""))
                with contextlib.suppress(OperationFailed):
                    cancel_migration(monitor, time.monotonic() + 30)
                if status == "running":
                    # `cont` also takes the disks back if the migration had completed.
                    monitor.execute("cont")
                raise
            completed = True
        finally:
            os.close(fd)
            if not completed:
                paths.state_tmp.unlink(missing_ok=True)
        progress.step(96)
        try:
            publish_saved_state(
                paths, config, machine_type=machine_type, qemu_version=version, run_state=status
            )
        except BaseException:
            # Without a complete state the VM must keep running, as if never saved.
            discard_saved_state(paths)
            with contextlib.suppress(OperationFailed):
                if status == "running":
                    monitor.execute("cont")
            raise
        progress.step(98)
        # The state is durable: from here the VM is Saved and its process must go.
        context.log("state published; QMP quit")
        with contextlib.suppress(OperationFailed):
            monitor.execute("quit")
    if not wait_pid(pid, paths, TURN_OFF_GRACE):
        force_stop(paths)
    cleanup(paths)
    progress.step(100)


def _follow_migration(
    monitor: Monitor, context: OperationContext, progress: ProgressSpan, deadline: float
) -> None:
    seen = None
    while True:
        info = monitor.execute("query-migrate")
        state = info.get("status")
        ram = info.get("ram") or {}
        if state != seen:  # each change of the migration's state, not every poll
            seen = state
            context.log(f"QMP query-migrate: {state}"
                        + (f", {ram.get('transferred', 0)} bytes written" if ram else ""))
        if ram.get("total"):
            progress.span(5, 95, 1 - ram.get("remaining", 0) / ram["total"])
        if state == "completed":
            return
        if state in ("failed", "cancelled"):
            detail = info.get("error-desc", state)
            if "no space left" in detail.lower():
                raise DiskError(f"Saving the VM state failed: {detail}", hresults.DISK_FULL)
            raise OperationFailed(f"Saving the VM state failed: {detail}")
        if context.cancel_requested():
            # A cancel that arrives once the state is complete is too late to honour.
            if cancel_migration(monitor, time.monotonic() + 30) == "completed":
                return
            raise Cancelled()
        if time.monotonic() > deadline:
            raise OperationTimedOut("Saving the VM state took too long")
        time.sleep(POLL_INTERVAL)
