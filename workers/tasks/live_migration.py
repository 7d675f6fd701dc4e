"""Live migration of a Running or Paused VM: two tasks, one per host.

The producer submits both at once, each knowing the other's id, and follows the
source task (`live_out`), which drives; the destination task (`live_in`)
prepares, then waits to be told to move the record or to give up.  They talk through
one hash, ``keys.transfer(transfer_id)``, and each wakes the other at once with a
push on its wake list (``<hash>:wake:<side>``, read with BLPOP):

1. ``manifest`` (source): each disk's path, format and sizes, ``chain``: the
   images below a disk's top (an undo disk's base, a differencing disk's parents:
   `workers.tasks.live_chain` copies them first; a snapshot tree's other files
   go with them: `workers.tasks.tree_moves`), and ``creds``, the
   kind of the source's transfer TLS.  The destination refuses a name clash, a
   format QEMU cannot migrate, a missing kernel, too little space or other TLS
   credentials than its own before anything moves (its task fails; the source
   sees it).
2. ``incoming`` (destination): fresh disks (listed in the VM's directory until the
   switch-over, for a crashed worker's successor to remove), a QEMU started
   ``-incoming defer -S`` and an NBD server with a one-time export per disk
   (`workers.engines.qemu_vm.livemigrate`).
3. The source mirrors the disks, migrates, cancels its ready mirrors, then sets
   ``switch``.  Until then any cancel or failure rolls back: the guest runs on at
   the source and the destination kills its QEMU and removes its files.
4. The destination moves the record's host with the fenced compare-and-set of
   ``vm_move.lua`` (only if it still names the source and ``abort`` is not set)
   and only then runs the guest (``cont``): the guest never runs where the record
   does not point.  It sets ``committed``; the source then quits its QEMU and
   removes the VM's files.  A source that gives up (cancel, the destination's
   failure or death) sets ``abort`` with ``vm_move_abort.lua``, only while the
   record still names it: one of the two scripts wins, never both, so the guest
   resumes on exactly one host.

The VM's recorded state stays Running (or Paused) throughout; both tasks hold
the VM's lock on their host, so no other operation interleaves.  Both also
journal in the VM's folder for a successor should their worker die
(`workers.tasks.live_recovery`): the source lists its disks and the transfer in
``outgoing.json`` before anything moves, the destination the disks it receives,
and whether the guest ran, in ``incoming.json`` until its guest runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import redis

from api.enums import VMVMState as S
from api.errors import InvalidStateError
from api.protocol import hresults, keys, tasks
from api.protocol import transfer as xfer
from api.scripts import Scripts
from workers.engines import qemu_img, qemu_vm, transfer_tls
from workers.engines.context import raise_if_cancelled
from workers.engines.files import HostFiles
from workers.engines.qemu_vm import livemigrate
from workers.engines.qemu_vm.lifecycle import read_logs
from workers.engines.qemu_vm.process import force_stop, wait_pid
from workers.engines.storage import free_space
from workers.failures import Cancelled, DiskError, IllegalValue, OperationFailed, PeerFailed
from workers.runtime import TaskRun, operation
from workers.tasks import live_chain, migration_journal, tree_moves
from workers.tasks.migration import move_record
from workers.tasks.transfer import OFFER_TTL_SECONDS, PeerWatch
from workers.tasks.vms import (
    config_of,
    open_vm_files,
    paths_of,
    record_of,
    record_runtime,
    vm_lock,
)

log = logging.getLogger(__name__)

LIVE = frozenset({S.Running, S.Paused})
WATCH = 0.05
MIGRATION_TIMEOUT = 3600.0
# In a destination's VM directory until the switch-over: the disks it is receiving.
SOURCE, DESTINATION = xfer.SOURCE, xfer.DESTINATION
GAVE_UP = "gave up the migration"


wake_key = xfer.wake


def _send_signal(client: redis.Redis, key: str, side: str, fields: dict[str, str]) -> None:
    """Set ``fields`` in the transfer hash and wake ``side`` to read them."""
    pipe = client.pipeline(transaction=True)
    pipe.hset(key, mapping=fields)
    pipe.expire(key, OFFER_TTL_SECONDS)
    pipe.rpush(wake_key(key, side), "1")
    pipe.expire(wake_key(key, side), OFFER_TTL_SECONDS)
    pipe.execute()


def _signal(run: TaskRun, key: str, side: str, fields: dict[str, str]) -> None:
    """`_send_signal` across a Redis outage (sent again, it at most wakes its side
    once more)."""
    run.ride_out(lambda: _send_signal(run.redis, key, side, fields), f"signalling the {side}")


def _nap(run: TaskRun, key: str, side: str) -> None:
    """Wait for the other side's next signal, at most `WATCH` seconds."""
    run.ride_out(lambda: run.redis.blpop([wake_key(key, side)], timeout=WATCH),
                 "waiting for the peer's signal")


def _read(run: TaskRun, key: str, *fields: str) -> list[str | None]:
    """Fields of the transfer hash; a Redis outage is a reading that comes later."""
    values: list[str | None] = run.ride_out(lambda: run.redis.hmget(key, list(fields)),
                                            "reading the migration's hash")
    return values


def _check_formats(disks: list[dict[str, Any]]) -> None:
    blocked = [d["path"] for d in disks if d["format"] not in livemigrate.MIRRORABLE_FORMATS]
    if blocked:
        raise IllegalValue("QEMU migrates only qcow2 and raw disks live; move these cold "
                           f"(turn the VM off first): {', '.join(blocked)}")


# -- the source -----------------------------------------------------------------------


@operation(tasks.VM_LIVE_OUT)
def live_out(run: TaskRun, name: str, destination_host: str, transfer_id: str,
             peer_task_id: str) -> dict[str, Any]:
    files = HostFiles.of(run.settings)
    client = run.redis
    key = keys.transfer(transfer_id)
    with vm_lock(run, name):
        record = record_of(client, run.settings, name)
        tree_moves.refuse_clone_links(run, record)
        if S(int(record["state"])) not in LIVE:
            raise InvalidStateError(f"VM {name!r} is {S(int(record['state'])).name}: only a "
                                    "Running or Paused VM migrates live")
        config = config_of(run.settings, record)
        paths = paths_of(run.settings, name)
        _check_formats([{"path": files.relative(files.resolve(relative)),
                         "format": qemu_vm.disk_format(path)}
                        for relative, path in zip(json.loads(record["disks"]), config.disks,
                                                  strict=True)])
        # Before anything moves: the disks to remove here should this worker die
        # once the destination has the VM, and the transfer, for its successor to
        # fence the destination out before it takes the guest back (`live_recovery`).
        journal = migration_journal.write(run.settings, name, run.task_id,
                                     json.loads(record["disks"]),
                                     journal=migration_journal.OUTGOING, transfer_id=transfer_id)
        sent = _Send(run, files, record, config, key,
                     PeerWatch.of(run, peer_task_id, destination_host))
        try:
            with qemu_vm.connect(paths) as monitor:
                final, handoff = sent.send(monitor)
                run.report_progress(98)
                with contextlib.suppress(OperationFailed):
                    monitor.execute("quit")
        except BaseException:
            if sent.stays:
                journal.unlink(missing_ok=True)  # the guest runs on here, on these disks
            raise
        pid = qemu_vm.find_pid(paths)
        if pid is not None and not wait_pid(pid, paths, 10.0):
            force_stop(paths)
        for relative in json.loads(record["disks"]):
            files.resolve(relative).unlink(missing_ok=True)
        shutil.rmtree(paths.directory, ignore_errors=True)  # the journal last
    run.ride_out(lambda: client.delete(key, wake_key(key, SOURCE), wake_key(key, DESTINATION)),
                 "removing the migration's hash")
    if sent.late is not None:
        # The VM is the destination's, but its task did not see it through (its
        # worker died before `cont`: its restart runs the guest).
        raise PeerFailed(f"{sent.late}, after the VM had moved to it", sent.late.result,
                         sent.late.hresult)
    # downtime_ms is QEMU's (the guest stopped until the migration completed); the
    # guest stays stopped through the switch-over too, so paused_ms bounds its pause.
    downtime = int(final.get("downtime", 0))
    return {"host": destination_host, "downtime_ms": downtime,
            "paused_ms": downtime + round(handoff * 1000),
            "total_time_ms": final.get("total-time")}


@dataclasses.dataclass
class _Send:
    """The source's side of the handshake, on the VM's QMP connection."""

    run: TaskRun
    files: HostFiles
    record: dict[str, str]
    config: qemu_vm.VMConfig
    key: str
    destination: PeerWatch
    stays: bool = True
    """Whether the guest surely stays here: true until the switch-over is signalled,
    and again once taking it back has won the fence."""
    late: PeerFailed | None = None
    """The destination's failure once it had taken the VM over."""

    def check(self) -> None:
        self.destination.check("destination", gave_up=GAVE_UP)

    def fence(self, deadline: float) -> str:
        """``vm_move_abort.lua``'s outcome once the switch-over was signalled, sent
        again while Redis is out of reach (this host cut off) until the deadline.

        The guest is stopped here and may be running on the destination: only the
        fence tells whether to take it back or remove this copy, so a host whose link
        returns settles it at once rather than at its worker's next start.  The
        script is idempotent: a reply lost with the link changes nothing.
        """
        name, client = self.record["name"], self.run.redis
        while True:
            try:
                return str(Scripts.of(client).vm_move_abort(
                    record=keys.vm_record(name), transfer=self.key,
                    wake=wake_key(self.key, DESTINATION), source=self.run.settings.host))
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("Cannot reach Redis to settle the migration of %s (the guest "
                            "stays stopped here until it can): %s", name, exc)
                time.sleep(1.0)

    def send(self, monitor: qemu_vm.Monitor) -> tuple[dict[str, Any], float]:
        """Migrate until the destination has taken over: QEMU's final query-migrate and
        how long the guest stood still after it completed."""
        run, client, key, settings = self.run, self.run.redis, self.key, self.run.settings
        name = self.record["name"]
        deadline = time.monotonic() + MIGRATION_TIMEOUT
        creds = transfer_tls.creds_of(settings)
        disks, below = live_chain.manifest(monitor, self.files, self.config)
        below += tree_moves.live_extras(run, name, below)  # a snapshot tree's other files
        outgoing = livemigrate.Outgoing.begin(
            monitor, self.config, run, max_bandwidth=settings.migrate_max_bandwidth,
            creds=creds, stall_seconds=settings.transfer_stall_seconds)
        _signal(run, key, DESTINATION, {xfer.MANIFEST: json.dumps(disks),
                                        xfer.CHAIN: json.dumps(below),
                                        xfer.CREDS: transfer_tls.kind_of(creds)})
        try:

            def between() -> None:
                self.check()
                raise_if_cancelled(run)
                _nap(run, key, SOURCE)

            raw = live_chain.await_incoming(
                run, self.files, key, below, outgoing,
                lambda fields: _signal(run, key, DESTINATION, fields), between)
            incoming = livemigrate.Incoming.from_dict(json.loads(raw))
            outgoing.mirror(incoming, live_chain.syncs(disks))
            outgoing.wait_ready(run, self.check, deadline)
            final = outgoing.migrate(incoming, run, self.check, deadline)
            stopped = time.monotonic()  # the guest stays stopped until the cont there
            outgoing.finish_mirrors(deadline)
            self.stays = False  # from here the destination may move the record (the fence decides)
            _signal(run, key, DESTINATION, {xfer.SWITCH: "1"})
            while _read(run, key, xfer.COMMITTED)[0] != "1":
                self.check()
                raise_if_cancelled(run)  # honoured until the destination moves the record
                _nap(run, key, SOURCE)
            return final, time.monotonic() - stopped
        except BaseException as exc:
            if self.stays:
                # Never told to move (``switch``), the destination cannot take the guest: it
                # is ours to take back even with Redis out of reach (a host cut off).
                try:
                    outgoing.rollback()
                finally:
                    with contextlib.suppress(redis.RedisError):
                        Scripts.of(client).vm_move_abort(
                            record=keys.vm_record(name), transfer=key,
                            wake=wake_key(key, DESTINATION), source=settings.host)
                raise
            outcome = self.fence(deadline)
            if outcome == "ABORTED":
                # The destination can no longer take the VM: the guest runs on here.
                self.stays = True
                outgoing.rollback()
                raise
            # The destination took the VM over: the guest is its to run.  A cancel
            # came too late; its failure or death is the task's once this side is clean.
            if isinstance(exc, PeerFailed):
                self.late = exc
            return final, time.monotonic() - stopped


# -- the destination ------------------------------------------------------------------


def _wait_manifest(run: TaskRun, key: str, source: PeerWatch) -> list[dict[str, Any]]:
    while not (raw := _read(run, key, xfer.MANIFEST)[0]):
        source.check("source", gave_up=GAVE_UP)
        raise_if_cancelled(run)
        _nap(run, key, DESTINATION)
    disks: list[dict[str, Any]] = json.loads(raw)
    return disks


def _refuse_incompatible(run: TaskRun, files: HostFiles, disks: list[dict[str, Any]],
                         targets: list[Path]) -> None:
    here = run.settings.host
    _check_formats(disks)
    clash = [d["path"] for d, t in zip(disks, targets, strict=True) if os.path.lexists(t)]
    if clash:
        raise DiskError(f"Already on {here}: {', '.join(clash)}", hresults.FILE_EXISTS)
    needed = sum(int(d["allocated"]) for d in disks)
    if free_space(files.root) < needed:
        raise DiskError(f"Host {here} has too little space for the VM's disks ({needed} "
                        "bytes)", hresults.DISK_FULL)


def _reserve(item: dict[str, Any], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        raise DiskError(f"{item['path']} appeared meanwhile", hresults.FILE_EXISTS) from None


def _create_disk(run: TaskRun, item: dict[str, Any], args: list[str]) -> None:
    """An empty top, through the runner like every qemu-img run (logged, killed with
    its worker); not cancelable: it takes no time, and a half-made file is removed
    with ``made`` anyway."""
    try:
        qemu_img.run_qemu_img(["create", "-q", *args], run, cancelable=False)
    except OperationFailed as exc:
        raise DiskError(f"Could not create {item['path']}: {exc}") from None


def _wait_switch(run: TaskRun, key: str, paths: qemu_vm.VMPaths, source: PeerWatch) -> None:
    while True:
        switch, abort = _read(run, key, xfer.SWITCH, xfer.ABORT)
        if abort == "1":
            raise Cancelled(f"The source host {source.host} {GAVE_UP}")
        if switch == "1":
            return
        source.check("source", gave_up=GAVE_UP)
        if not qemu_vm.is_alive(paths):
            raise OperationFailed("The destination QEMU stopped during the migration")
        raise_if_cancelled(run)
        _nap(run, key, DESTINATION)


def _record_taken_over(run: TaskRun, key: str, name: str, paths: qemu_vm.VMPaths,
                       record: dict[str, str]) -> None:
    """Tell the source, and record the QEMU that now runs the guest (`details`).

    The guest runs here already: with Redis out of reach (this host cut off) the
    writes are sent again until it answers, rather than leaving the record with the
    source's QEMU until this worker's next start.  The source, meanwhile, judges
    this task dead by its lease, finds the VM moved and removes its copies; the
    transfer hash it then deletes is not made again.
    """
    client = run.redis
    deadline = time.monotonic() + MIGRATION_TIMEOUT
    while True:
        try:
            if client.exists(key):
                _send_signal(client, key, SOURCE, {xfer.COMMITTED: "1"})
            pid = qemu_vm.find_pid(paths)
            if pid is not None:
                record_runtime(client, name, paths, pid)
                # The guest's uptime runs on from its start on the source.
                client.hset(keys.vm_record(name), "started",
                            record.get("started", repr(time.time())))
            return
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("Cannot reach Redis to record the migration of %s (the guest "
                        "runs here): %s", name, exc)
            time.sleep(1.0)


@operation(tasks.VM_LIVE_IN)
def live_in(run: TaskRun, name: str, source_host: str, transfer_id: str,
            peer_task_id: str) -> dict[str, Any]:
    files = HostFiles.of(run.settings)
    client = run.redis
    key = keys.transfer(transfer_id)
    record: dict[str, str] = run.ride_out(lambda: client.hgetall(keys.vm_record(name)),
                                          "reading the VM's record")
    if not record or record.get("host") != source_host:
        raise IllegalValue(f"VM {name!r} is not on host {source_host}")
    paths = paths_of(run.settings, name)
    if paths.directory.exists() and any(p.name != ".lock" for p in paths.directory.iterdir()):
        raise DiskError(f"{files.relative(paths.directory)} already exists on "
                        f"{run.settings.host}", hresults.FILE_EXISTS)
    source = PeerWatch.of(run, peer_task_id, source_host)
    disks = _wait_manifest(run, key, source)
    chain, peer_creds = _read(run, key, xfer.CHAIN, xfer.CREDS)
    below: list[dict[str, Any]] = json.loads(chain or "[]")
    targets = [files.resolve_output(d["path"]) for d in disks]
    creds = transfer_tls.creds_of(run.settings)
    transfer_tls.check_peer(creds, peer_creds or "", here=run.settings.host,
                            peer=source_host)
    _refuse_incompatible(run, files, [*below, *disks],
                         [*(files.resolve_output(b["path"]) for b in below), *targets])
    config = config_of(run.settings, record)  # a missing kernel or initrd: refused here
    # The disks get their final names at once: QEMU reopens an image by its name (at
    # the next migration's switch-over, for one), so a rename under it would break
    # it.  Until the switch-over they are listed in the VM's directory, for
    # `live_recovery` should this worker die meanwhile.
    listing = paths.directory / migration_journal.JOURNAL
    made: list[Path] = []
    committed = False
    try:
        with vm_lock(run, name):
            # ``running``: what a successor does should this worker die between the
            # switch-over and the guest's `cont` (`live_recovery`).
            migration_journal.write(run.settings, name, run.task_id,
                               [d["path"] for d in [*below, *disks]],
                               running=S(int(record["state"])) is S.Running)

            def between() -> None:
                source.check("source", gave_up=GAVE_UP)
                raise_if_cancelled(run)
                _nap(run, key, DESTINATION)

            live_chain.pull_below(run, files, key, below, source_host, peer_task_id,
                                  lambda fields: _signal(run, key, SOURCE, fields),
                                  between, made)
            for item, target in zip(disks, targets, strict=True):
                _reserve(item, target)
                made.append(target)
                _create_disk(run, item, live_chain.create_top(files, item, target, below))
            tree_moves.arrived(run, name)  # a snapshot tree's chains confined, layers frozen
            exports = tuple(livemigrate.new_export_name() for _ in disks)
            with contextlib.ExitStack() as opened_files:
                # Each chain checked and handed over by descriptor, as at a start.
                incoming = livemigrate.start_incoming(
                    dataclasses.replace(config, disks=tuple(str(t) for t in targets)), paths,
                    run, address=run.settings.advertise_address,
                    ports=run.settings.transfer_ports, exports=exports, creds=creds,
                    opened=open_vm_files(run, record, paths, opened_files))
            _signal(run, key, SOURCE, {xfer.INCOMING: json.dumps(incoming.to_dict())})
            run.report_progress(10)
            # Connected before the switch-over: the guest is stopped throughout it.
            with qemu_vm.connect(paths) as monitor:
                _wait_switch(run, key, paths, source)
                livemigrate.stop_serving(monitor)
                outcome = move_record(run, name, source_host, LIVE, key)
                if outcome == "ABORTED":
                    raise Cancelled(f"The source host {source_host} took the guest back")
                if outcome != "OK":
                    raise InvalidStateError(f"VM {name!r} changed during the migration "
                                            f"({outcome})")
                committed = True
                livemigrate.run_guest(monitor, run=S(int(record["state"])) is S.Running)
            listing.unlink()
            _record_taken_over(run, key, name, paths, record)
    except BaseException:
        if not committed:
            log.warning("Migration of %s into this host failed; its QEMU said: %s", name,
                        read_logs(paths) or "nothing")
            force_stop(paths)
            qemu_vm.cleanup(paths)
            for path in made:
                path.unlink(missing_ok=True)
            shutil.rmtree(paths.directory, ignore_errors=True)
        raise
    return {"host": run.settings.host, "disks": len(disks)}
