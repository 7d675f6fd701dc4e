"""The VM operations as Celery tasks, and the host's watch over its VMs.

Every operation takes the VM's lock (an fcntl lock in its directory, so it dies
with its holder), moves the recorded state with the atomic compare-and-set of
`api.protocol.vmstate`, drives QEMU through `workers.engines.qemu_vm`, and moves the state on to
where QEMU really is, on success and on failure alike.

The host's beacon also calls `watch_vms` on every beat: a VM that stopped by
itself (guest powered off, QEMU crashed) becomes TurnedOff or Invalid.  When a
worker starts, `reconcile_vms` matches the recorded states with the QEMU
processes that really run: VMs outlive worker restarts.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import redis

from api.enums import VMVMState as S
from api.errors import InvalidStateError
from api.protocol import keys, tasks
from api.protocol import vm as vm_schema
from api.protocol.snapshots import linked_clones
from api.protocol.vmstate import (
    ALLOWED,
    EVENTS_MAXLEN,
    RUNTIME_FIELDS,
    allowed_csv,
)
from api.scripts import Scripts
from api.settings import Settings
from workers.engines import qemu_img, qemu_vm
from workers.engines import snapshots as snapshot_layers
from workers.engines.context import scaled
from workers.engines.files import HostFiles
from workers.engines.guest_agent import qemu_guest_agent_args
from workers.engines.storage import resolve_in_root
from workers.failures import (
    IllegalValue,
    OperationTimedOut,
    VMNotRunning,
)
from workers.runtime import TaskRun, operation

log = logging.getLogger(__name__)

LOCK_TIMEOUT = 30.0


def root(settings: Settings) -> Path:
    return HostFiles.of(settings).root


def record_of(client: redis.Redis, settings: Settings, name: str) -> dict[str, str]:
    record: dict[str, str] = client.hgetall(keys.vm_record(name))
    if not record:
        raise IllegalValue(f"No VM named {name!r}")
    if record["host"] != settings.host:
        raise IllegalValue(f"VM {name!r} belongs to host {record['host']}, not {settings.host}")
    return record


def paths_of(settings: Settings, name: str) -> qemu_vm.VMPaths:
    return qemu_vm.VMPaths.for_vm(root(settings), name)


def undo_overlay(paths: qemu_vm.VMPaths, index: int, base: Path) -> Path:
    return paths.directory / "undo" / f"{index}-{base.stem}.qcow2"


def config_of(settings: Settings, record: dict[str, str]) -> qemu_vm.VMConfig:
    """The QEMU configuration; an undoable VM runs on its qcow2 overlays."""
    name = record["name"]
    paths = paths_of(settings, name)
    disks: list[str] = []
    for index, disk in enumerate(json.loads(record["disks"])):
        base = resolve_in_root(root(settings), disk)
        # A VM with snapshots runs on its present overlay (workers.engines.snapshots).
        top = snapshot_layers.present_disk(paths.directory, index, disk) or base
        disks.append(str(undo_overlay(paths, index, base) if record["undoable"] == "1"
                         else top))
    extra: list[str] = []
    if record.get("guest_agent") == "1":
        extra = qemu_guest_agent_args(agent_socket(paths))

    def in_root(value: str) -> str | None:
        return str(resolve_in_root(root(settings), value, must_exist=True)) if value else None

    return qemu_vm.VMConfig(
        name=name, memory_mb=int(record["memory_mb"]), disks=disks,
        kernel=in_root(record.get("kernel", "")), initrd=in_root(record.get("initrd", "")),
        append=record.get("append") or None, extra_args=extra, accel=settings.accel,
        cpus=int(record.get("cpus") or 1), network=record.get("network") or None,
        port_forwards=json.loads(record.get("port_forwards") or "[]"),
        mac=record.get("mac") or None, forward_listen=settings.forward_listen,
        vga=True, vnc_listen=settings.vnc_listen,
    )


def agent_socket(paths: qemu_vm.VMPaths) -> Path:
    return paths.directory / "qga.sock"


def transition(client: redis.Redis, name: str, allowed: frozenset[S], new: S,
               host: str = "") -> S:
    """Compare-and-set the recorded state; `InvalidStateError` if it is not in ``allowed``
    (or, with ``host``, if the record no longer names that host)."""
    outcome, old = Scripts.of(client).vm_transition(
        record=keys.vm_record(name), events=keys.VM_EVENTS, allowed=allowed_csv(allowed),
        state=int(new), now=repr(time.time()), max_events=EVENTS_MAXLEN, host=host)
    if outcome == "MISSING":
        raise IllegalValue(f"No VM named {name!r}")
    if outcome == "ELSEWHERE":
        raise InvalidStateError(f"VM {name!r} is no longer on {host}")
    if outcome == "REFUSED":
        raise InvalidStateError(f"VM {name!r} is {S(int(old)).name}: cannot go to {new.name}")
    return S(int(old))


def settle(client: redis.Redis, name: str, state: S) -> None:
    """Record where the VM really is after an operation, from whatever state it was in."""
    transition(client, name, frozenset(S), state)
    if state in (S.TurnedOff, S.Saved):
        client.hdel(keys.vm_record(name), *RUNTIME_FIELDS)


def record_runtime(client: redis.Redis, name: str, paths: qemu_vm.VMPaths, pid: int) -> None:
    """What `details` shows of a started VM: its process, uptime and console.

    The VNC password is new at every start (VNC allows 8 characters); it lives in
    the VM's record for `console_access`, never in a task record or a log.
    """
    password = secrets.token_urlsafe(6)[:8]
    vnc = qemu_vm.setup_vnc(paths, password)
    client.hset(keys.vm_record(name), mapping={
        "pid": str(pid), "started": repr(time.time()), "vnc": vnc or "",
        "vnc_password": password if vnc else ""})


def try_lock(settings: Settings, name: str, create: bool = True) -> int | None:
    """The VM's lock file descriptor, locked; None while another holder has it (or,
    with ``create`` False, when the VM has no directory here)."""
    paths = paths_of(settings, name)
    if create:
        paths.directory.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(paths.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextmanager
def vm_lock(run: TaskRun, name: str) -> Iterator[None]:
    """Serialize operations on one VM across the host's pool processes."""
    deadline = time.monotonic() + LOCK_TIMEOUT
    while (fd := try_lock(run.settings, name)) is None:
        if time.monotonic() > deadline:
            raise OperationTimedOut(f"VM {name!r} stayed busy with another task")
        run.sleep(0.05)
    try:
        yield
    finally:
        os.close(fd)


def operation_of(run: TaskRun) -> str:
    """The VM operation ``run`` runs, by the name `ALLOWED` knows it: its spec's, so a
    body cannot check another operation's states."""
    if run.spec is None:
        raise TypeError(f"Task {run.task_id} runs without its operation's spec")
    return run.spec.vm_operation


def begin(run: TaskRun, name: str, new: S | None) -> tuple[redis.Redis, dict[str, str], S]:
    """Check that ``run``'s operation may start from VM ``name``'s state, or move it to
    ``new`` by that check (`transition`)."""
    client = run.redis
    record = record_of(client, run.settings, name)
    operation_name = operation_of(run)
    allowed = ALLOWED[operation_name]
    if new is None:
        current = S(int(record["state"]))
        if current not in allowed:
            raise InvalidStateError(f"Cannot {operation_name} VM {name!r} while {current.name}")
        return client, record, current
    return client, record, transition(client, name, allowed, new)


# -- lifecycle ----------------------------------------------------------------------


@operation(tasks.VM_STARTUP)
def startup(run: TaskRun, name: str) -> None:
    with vm_lock(run, name), ExitStack() as opened_files:
        client, record, current = begin(run, name, None)
        paths = paths_of(run.settings, name)
        if current is S.Saved:
            transition(client, name, frozenset({S.Saved}), S.Restoring)
            try:
                config = config_of(run.settings, record)
                opened = open_vm_files(run, record, paths, opened_files)
                pid = qemu_vm.start(config, paths, run, incoming_state=paths.state_file,
                                    opened=opened)
            except BaseException:
                settle(client, name, S.Saved)
                raise
        else:
            transition(client, name, frozenset({S.TurnedOff}), S.TurningOn)
            try:
                # Read again: a configure that landed before the transition counts.
                record = record_of(client, run.settings, name)
                config = config_of(run.settings, record)
                opened = open_vm_files(run, record, paths, opened_files, make_undo=True)
                pid = qemu_vm.start(config, paths, run, opened=opened)
            except BaseException:
                settle(client, name, S.TurnedOff)
                raise
        opened_files.close()  # QEMU holds its own descriptors now
        try:
            record_runtime(client, name, paths, pid)
        finally:
            settle(client, name, qemu_vm.vm_state(paths))


def open_vm_files(run: TaskRun, record: dict[str, str], paths: qemu_vm.VMPaths,
                  stack: ExitStack, *, make_undo: bool = False) -> qemu_vm.OpenedFiles:
    """Every disk's whole chain (its undo overlay's when undoable), the kernel and the
    initrd, checked and opened by descriptor beneath the root (`HostFiles.open_chain`):
    QEMU gets those descriptors, never a name it could follow elsewhere.  With
    ``make_undo`` a missing undo overlay is created over the checked base first."""
    files = HostFiles.of(run.settings)
    drives = []
    for index, disk in enumerate(json.loads(record["disks"])):
        base = files.resolve(disk, must_exist=True)
        chain = files.open_chain(base, stack)
        if (top := snapshot_layers.present_disk(paths.directory, index, disk)) is not None:
            chain = files.open_chain(top, stack)
        if record["undoable"] == "1":
            overlay = undo_overlay(paths, index, base)
            if make_undo and not os.path.lexists(overlay):
                overlay.parent.mkdir(parents=True, exist_ok=True)
                qemu_img.create_differencing(overlay, base, run,
                                             parent_info=chain.links[0].info)
            chain = files.open_chain(overlay, stack)
        drives.append(chain.pinned())
    kernel, initrd = record.get("kernel", ""), record.get("initrd", "")
    return qemu_vm.OpenedFiles(drives=drives,
                               kernel=files.open_file(kernel, stack) if kernel else None,
                               initrd=files.open_file(initrd, stack) if initrd else None)


@operation(tasks.VM_SAVE)
def save(run: TaskRun, name: str) -> None:
    with vm_lock(run, name):
        client, record, _ = begin(run, name, S.Saving)
        paths = paths_of(run.settings, name)
        try:
            qemu_vm.save(config_of(run.settings, record), paths, run,
                         max_bandwidth=run.settings.save_max_bandwidth or None)
        except BaseException:
            settle(client, name, qemu_vm.vm_state(paths))
            raise
        settle(client, name, S.Saved)


def simple_command(run: TaskRun, name: str, after: S, command: Any) -> None:
    with vm_lock(run, name):
        client, _record, _current = begin(run, name, None)
        paths = paths_of(run.settings, name)
        try:
            command(paths)
        except VMNotRunning:
            settle(client, name, qemu_vm.vm_state(paths))
            raise
        transition(client, name, ALLOWED[operation_of(run)], after)


@operation(tasks.VM_PAUSE)
def pause(run: TaskRun, name: str) -> None:
    simple_command(run, name, S.Paused, qemu_vm.pause)


@operation(tasks.VM_RESUME)
def resume(run: TaskRun, name: str) -> None:
    simple_command(run, name, S.Running, qemu_vm.resume)


@operation(tasks.VM_RESET)
def reset(run: TaskRun, name: str) -> None:
    with vm_lock(run, name):
        begin(run, name, None)
        qemu_vm.reset(paths_of(run.settings, name))


@operation(tasks.VM_TURN_OFF)
def turn_off(run: TaskRun, name: str) -> None:
    with vm_lock(run, name):
        client, _record, current = begin(run, name, None)
        paths = paths_of(run.settings, name)
        if current is S.Saved:
            qemu_vm.discard_saved_state(paths)
            transition(client, name, frozenset({S.Saved}), S.TurnedOff)
            return
        transition(client, name, ALLOWED[operation_of(run)], S.TurningOff)
        try:
            qemu_vm.turn_off(paths)
        finally:
            settle(client, name, qemu_vm.vm_state(paths))


# -- undo disks and deletion ----------------------------------------------------------


def overlays_of(settings: Settings, record: dict[str, str], paths: qemu_vm.VMPaths
                ) -> list[Path]:
    return [undo_overlay(paths, i, resolve_in_root(root(settings), disk))
            for i, disk in enumerate(json.loads(record["disks"]))]


@operation(tasks.VM_MERGE_UNDO_DISKS)
def merge_undo_disks(run: TaskRun, name: str) -> None:
    with vm_lock(run, name):
        client, record, _ = begin(run, name, S.MergingDrives)
        try:
            overlays = [o for o in overlays_of(run.settings, record, paths_of(run.settings, name))
                        if o.exists()]
            files = HostFiles.of(run.settings)
            for index, overlay in enumerate(overlays):
                share = scaled(run, 100 * index / len(overlays),
                               100 * (index + 1) / len(overlays))
                with ExitStack() as stack:
                    chain = files.open_chain(overlay, stack)
                    qemu_img.merge(overlay, share, chain=chain.pinned())
                overlay.unlink()
        finally:
            settle(client, name, S.TurnedOff)


@operation(tasks.VM_DISCARD_UNDO_DISKS)
def discard_undo_disks(run: TaskRun, name: str) -> None:
    with vm_lock(run, name):
        _client, record, _ = begin(run, name, None)
        for overlay in overlays_of(run.settings, record, paths_of(run.settings, name)):
            overlay.unlink(missing_ok=True)


@operation(tasks.VM_DELETE)
def delete(run: TaskRun, name: str) -> None:
    with vm_lock(run, name):
        if clones := linked_clones(run.redis, name):
            raise InvalidStateError(f"VM {name!r} cannot be deleted: linked clones rest on "
                                    f"its snapshots ({', '.join(sorted(clones))})")
        client, _record, _ = begin(run, name, S.DeleteMachine)
        paths = paths_of(run.settings, name)
        qemu_vm.turn_off(paths)  # only an Invalid VM can still have a process here
        shutil.rmtree(paths.directory, ignore_errors=True)
        Scripts.of(client).vm_delete(
            record=keys.vm_record(name), names=keys.VM_NAMES, events=keys.VM_EVENTS,
            name=name, now=repr(time.time()), max_events=EVENTS_MAXLEN,
            state=int(S.DeleteMachine), host_vms_prefix=keys.HOST_VMS_PREFIX)


# -- the host's watch ------------------------------------------------------------------


# What the host's background work reads of its VMs (the watch, counters, rotation).
HOST_VM_FIELDS = (vm_schema.Field.NAME, vm_schema.Field.HOST, vm_schema.Field.STATE)


def host_vms(client: redis.Redis, settings: Settings) -> list[dict[str, str]]:
    """Name, host and state of the VMs this host owns: O(own VMs), one round trip.

    Read through the host's VM set (`keys.host_vms`, kept by the create, move and
    delete scripts), not the fleet's: the heartbeat's counters and the VM watch run
    on every beat of every host.  The record's own ``host`` field stays the truth;
    a name the set still holds after a move is skipped.
    """
    replies = Scripts.of(client).host_vm_records(
        host_vms=keys.host_vms(settings.host), record_prefix=keys.vm_record(""),
        fields=HOST_VM_FIELDS)
    records = [{f: v for f, v in zip(HOST_VM_FIELDS, r, strict=True) if v is not None}
               for r in replies]
    return sorted((r for r in records if r.get("host") == settings.host),
                  key=lambda r: r.get("name", ""))


def index_host_vms(client: redis.Redis, settings: Settings) -> None:
    """Start-up: put this host's VMs into its VM set (records written before the set
    existed).  O(fleet VMs), once per worker start, never per beat."""
    names = sorted(client.smembers(keys.VM_NAMES))
    if not names:
        return
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hget(keys.vm_record(name), "host")
    own = [n for n, host in zip(names, pipe.execute(), strict=True) if host == settings.host]
    if own:
        client.sadd(keys.host_vms(settings.host), *own)


# The host's VM records as its beat last read them: the heartbeat's counters, the
# VM watch and the console rotation run one after the other on each beat (one
# thread), and share one read.  The watch changes a VM only by compare-and-set.
_BEAT_READ_SECONDS = 0.5
_beat_read: dict[str, tuple[float, list[dict[str, str]]]] = {}


def beat_vms(client: redis.Redis, settings: Settings) -> list[dict[str, str]]:
    """`host_vms`, read at most once per beat (the host's background hooks)."""
    at, records = _beat_read.get(settings.host, (0.0, []))
    if time.monotonic() - at > _BEAT_READ_SECONDS:
        records = host_vms(client, settings)
        _beat_read[settings.host] = (time.monotonic(), records)
    return records


def stopped_state(paths: qemu_vm.VMPaths) -> S:
    """QEMU removes its pidfile on a clean exit: one left behind means it crashed."""
    return S.Invalid if paths.pidfile.exists() else S.TurnedOff


def watch_vms(client: redis.Redis, settings: Settings) -> None:
    """Notice VMs that stopped by themselves (guest power-off, QEMU crash).

    Under the VM's lock, so no operation is half-way through it; a VM whose lock is
    held is looked at on the next beat.  The records may be half a second old (one
    read per beat): a VM that moved away meanwhile has no directory here, which the
    watch must not recreate, and the state changes only while the record still
    names this host (a live migration's source must not turn off the destination's
    running guest).
    """
    for record in beat_vms(client, settings):
        if S(int(record["state"])) not in (S.Running, S.Paused):
            continue
        fd = try_lock(settings, record["name"], create=False)
        if fd is None:
            continue
        try:
            paths = paths_of(settings, record["name"])
            if qemu_vm.is_alive(paths):
                continue
            state = stopped_state(paths)
            qemu_vm.cleanup(paths)  # before the new state shows: no stale socket then
            try:
                transition(client, record["name"], frozenset({S.Running, S.Paused}), state,
                           host=settings.host)
            except InvalidStateError:
                continue  # it changed, or moved away, since we read it
            if state is S.TurnedOff:
                client.hdel(keys.vm_record(record["name"]), *RUNTIME_FIELDS)
            log.warning("VM %s stopped by itself: now %s", record["name"], state.name)
        finally:
            os.close(fd)


def reconcile_vms(client: redis.Redis, settings: Settings) -> None:
    """On start-up: trust the QEMU processes, not the records of a dead worker."""
    for record in host_vms(client, settings):
        recorded = S(int(record["state"]))
        paths = paths_of(settings, record["name"])
        actual = qemu_vm.vm_state(paths)
        if actual is S.TurnedOff and recorded in (S.Running, S.Paused):
            actual = stopped_state(paths)
        if actual is not recorded:
            settle(client, record["name"], actual)
            log.warning("Reconciled VM %s: recorded %s, really %s", record["name"],
                        recorded.name, actual.name)


def vm_counts(client: redis.Redis, settings: Settings) -> dict[str, Any]:
    vms = beat_vms(client, settings)
    running = sum(1 for r in vms if S(int(r["state"])) in (S.Running, S.Paused))
    return {"vms": len(vms), "vms_running": running}

