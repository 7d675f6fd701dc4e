"""Copying an image from one host to another: a serving task and a pulling task.

The producer submits both at once, each knowing the other's id.  The pull runs on
the destination host and is what the producer follows (progress, cancel, result).
The serve runs on the source host: once the pull has started it exports the image
read-only over NBD (`workers.engines.nbd`) with a one-time name, announces where in
``keys.transfer``, and keeps the export up until the pull's record is final or its
worker is gone.  The pull reads the export into a temporary beside its target and
publishes it only on success; the source file is only ever read, under a shared
lock, so it is untouched whatever happens.  Either side failing ends the other:
the pull ends with the serve's result (or ThreadCrashError when the source's
worker died), and the serve stops once the pull is final.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from api.enums import VMHardDiskType, VMTaskResult
from api.protocol import hresults, keys, records, tasks
from api.protocol import transfer as xfer
from api.protocol.records import Field
from api.settings import Settings
from workers.engines import nbd, qemu_img, transfer_tls
from workers.engines.beneath import open_beneath, proc_path
from workers.engines.context import OperationContext
from workers.engines.files import HostFiles
from workers.engines.storage import free_space
from workers.failures import Cancelled, DiskError, IllegalValue, OperationFailed, PeerFailed
from workers.runtime import TaskRun, operation

# How often each side looks at the other's record.
WATCH_INTERVAL = 0.1
# How long an announced export may stay in Redis if its serve dies without cleaning up.
OFFER_TTL_SECONDS = 24 * 3600
# Beyond a renewal period, how long a peer must stay without lease or heartbeat
# before it is judged dead (`PeerWatch`): the renewal's own Redis round trips.
CONFIRM_MARGIN = 1.0
MODES = ("image", "file")


@dataclass(frozen=True)
class Peer:
    state: str
    lease_alive: bool
    result: VMTaskResult | None
    error: int
    description: str

    @property
    def final(self) -> bool:
        return self.state in records.COMPLETE_STATES

    @property
    def gone(self) -> bool:
        """Started, but no live worker holds it: it crashed (the reaper will say so)."""
        return self.state == records.STARTED and not self.lease_alive


def read_peer(client: redis.Redis, task_id: str) -> Peer:
    # One instant: a peer finishing between the two reads would look gone.
    pipe = client.pipeline(transaction=True)
    pipe.hmget(keys.task_record(task_id), Field.STATE, Field.RESULT, Field.ERROR,
               Field.ERROR_DESCRIPTION)
    pipe.exists(keys.task_lease(task_id))
    (state, result, error, text), leased = pipe.execute()
    return Peer(state or records.PENDING, bool(leased),
                VMTaskResult(int(result)) if state in records.COMPLETE_STATES and result else None,
                int(error or 0), text or "")


class PeerWatch:
    """The other side of a transfer, judged from what persists in Redis.

    Final, its record says how it ended.  Dead is a verdict that needs two readings:
    the peer must look dead (started with no lease, or still queued on a host with
    no heartbeat) on every reading for `confirm_seconds`.  A live worker takes back
    a lapsed lease, and beats again, within a third of its lease and heartbeat (a
    Redis failover's new primary may briefly lack either key), so a miss that
    lasts longer than that is no transient one.
    """

    def __init__(self, client: redis.Redis, task_id: str, host: str | None, *,
                 confirm_seconds: float, run: TaskRun | None = None) -> None:
        self.client, self.task_id, self.host = client, task_id, host
        self.confirm_seconds = confirm_seconds
        # Whose `TaskRun.ride_out` carries a reading across a Redis outage.
        self.run = run
        self._missing_since: float | None = None

    @classmethod
    def of(cls, run: TaskRun, task_id: str, host: str | None = None) -> PeerWatch:
        """``host``: the peer's, if known; a peer still queued there is dead once the
        host's heartbeat is (without it, only a started peer can be judged dead)."""
        settings = run.settings
        return cls(run.redis, task_id, host, confirm_seconds=max(
            settings.lease_seconds, settings.heartbeat_seconds) / 3 + CONFIRM_MARGIN, run=run)

    def _reading(self) -> tuple[Peer, bool]:
        peer = read_peer(self.client, self.task_id)
        return peer, peer.gone or (peer.state == records.PENDING and self.host is not None
                                   and not self.client.exists(keys.host_heartbeat(self.host)))

    def read(self) -> tuple[Peer, bool]:
        """The peer now, and whether it is dead (looked so for `confirm_seconds`)."""
        tries, asked = 0, time.monotonic()

        def reading() -> tuple[Peer, bool]:
            nonlocal tries
            tries += 1
            return self._reading()

        if self.run is None:
            peer, looks_dead = reading()
        else:
            peer, looks_dead = self.run.ride_out(reading, f"reading the peer task {self.task_id}")
        now = time.monotonic()
        if tries > 1 or now - asked > CONFIRM_MARGIN:
            # The reading waited for Redis (restarting, killed, stopped): what the
            # peer did meanwhile is unknown, and its worker, too, may only now be
            # reconnecting to renew its lease.  The verdict's clock starts again.
            self._missing_since = None
        if not looks_dead or peer.final:
            self._missing_since = None
            return peer, False
        if self._missing_since is None:
            self._missing_since = now
        return peer, now - self._missing_since >= self.confirm_seconds

    def over(self) -> bool:
        """It ended, or its worker is dead: nobody is left on the other side."""
        peer, dead = self.read()
        return peer.final or dead

    def check(self, what: str, *, gave_up: str = "gave up the transfer") -> None:
        """Raise the peer's outcome once it ended, ThreadCrashError once it is dead.
        ``what``: the peer's role ("source", "destination"), for the descriptions."""
        peer, dead = self.read()
        if peer.final:
            if peer.result is VMTaskResult.Cancelled:
                raise Cancelled(f"The {what} host {self.host} {gave_up}")
            raise PeerFailed(f"The {what} host {self.host} failed: {peer.description}",
                             peer.result or VMTaskResult.UnexpectedError, peer.error)
        if dead:
            raise PeerFailed(f"The worker of the {what} host {self.host} is gone",
                             VMTaskResult.ThreadCrashError, hresults.SERVER_FAULT)


@dataclass(frozen=True)
class Served:
    spec: str
    fds: tuple[int, ...]
    virtual_size: int
    allocated: int
    fixed: bool


def open_served(files: HostFiles, source: Path, mode: str, stack: ExitStack) -> Served:
    """What qemu-nbd exports, opened beneath the root and share-locked with ``stack``."""
    if mode == "image":
        chain = files.open_chain(source, stack)
        stack.enter_context(files.file_locks(chain.reals, []))
        pinned = chain.pinned()
        head = chain.links[0].info
        return Served(pinned.spec(), pinned.fds, head.virtual_size,
                      sum(link.info.actual_size for link in chain.links),
                      head.disk_type is VMHardDiskType.FixedSize)
    fd = open_beneath(files.root, source)
    stack.callback(os.close, fd)
    stack.enter_context(files.file_locks([source], []))
    size = os.fstat(fd)
    return Served(nbd.file_spec(proc_path(fd)), (fd,), size.st_size, size.st_blocks * 512,
                  False)


def _wait(run: TaskRun, done: Callable[[], bool]) -> None:
    while not done():
        run.sleep(WATCH_INTERVAL)


@operation(tasks.DISK_SERVE)
def serve(run: TaskRun, path: str, transfer_id: str, client_task_id: str,
          mode: str) -> dict[str, Any]:
    if mode not in MODES:
        raise IllegalValue(f"mode must be one of {MODES}, not {mode!r}")
    files = HostFiles.of(run.settings)
    source = files.resolve(path, must_exist=True)
    offer_key = keys.transfer(transfer_id)
    # Nothing is exported before the client has accepted the copy: a pull queued
    # behind other work, or one its host refuses (a clash), costs the source no
    # open port.
    accepted = keys.transfer_accepted(transfer_id)
    client = PeerWatch.of(run, client_task_id)
    while not (over := client.over()) and not run.ride_out(
            lambda: run.redis.exists(accepted), "waiting for the copy to be accepted"):
        run.sleep(WATCH_INTERVAL)
    if over:
        return {"served": False}
    with ExitStack() as stack:
        served = open_served(files, source, mode, stack)
        export = stack.enter_context(nbd.serve(
            served.spec, address=run.settings.advertise_address,
            ports=run.settings.transfer_ports, name=nbd.new_export_name(),
            pass_fds=served.fds, creds=transfer_tls.creds_of(run.settings)))
        stack.callback(run.ride_out, lambda: run.redis.delete(offer_key, accepted),
                       "withdrawing the export")
        run.log(f"serving {path} read-only with qemu-nbd on {export.address}:{export.port}"
                + (f" (TLS: tls-creds-{export.creds.kind}, dir={export.creds.directory})"
                   if export.creds is not None else " (no TLS)"))
        publish(run, offer_key, {**offer_fields(export), xfer.VIRTUAL_SIZE: served.virtual_size,
                                 xfer.ALLOCATED: served.allocated, xfer.FIXED: int(served.fixed),
                                 xfer.HOST: run.settings.host}, "announcing the export")

        def client_done() -> bool:
            if not export.alive():
                raise OperationFailed("qemu-nbd stopped serving the image")
            return client.over()

        _wait(run, client_done)
    return {"served": True}


def _wait_for_offer(run: TaskRun, transfer_id: str, server_task_id: str,
                    source_host: str) -> dict[str, str]:
    """The export's address once the source serves it; the serve's failure otherwise."""
    offer_key = keys.transfer(transfer_id)
    source = PeerWatch.of(run, server_task_id, source_host)
    while True:
        offer: dict[str, str] = run.ride_out(lambda: run.redis.hgetall(offer_key),
                                             "waiting for the export")
        if offer:
            return offer
        source.check("source", gave_up="cancelled serving the image")
        run.sleep(WATCH_INTERVAL)


def _tls_objects(settings: Settings, offer: dict[str, str], source_host: str) -> list[str]:
    """The client's TLS credentials when the export is TLS; a mismatch is refused."""
    creds = transfer_tls.creds_of(settings)
    transfer_tls.check_peer(creds, offer.get(xfer.CREDS, ""), here=settings.host, peer=source_host)
    return [] if creds is None else [nbd.tls_object(creds, "client")]


def publish(run: TaskRun, key: str, fields: dict[str, Any], what: str) -> None:
    """Set ``fields`` in ``key``, which expires should nobody remove it, riding out a
    Redis outage (an offer, a migration's manifest)."""

    def write() -> None:
        # A pipeline forgets its commands when it fails: built anew for each try.
        pipe = run.redis.pipeline(transaction=True)
        pipe.hset(key, mapping=fields)
        pipe.expire(key, OFFER_TTL_SECONDS)
        pipe.execute()

    run.ride_out(write, what)


def offer_fields(export: nbd.Export) -> dict[str, str | int]:
    """What a pull needs to know of an export, announced in Redis."""
    return {xfer.ADDRESS: export.address, xfer.PORT: export.port, xfer.EXPORT: export.name,
            xfer.TLS: int(export.creds is not None),
            xfer.CREDS: transfer_tls.kind_of(export.creds)}


def pull_from(context: OperationContext, settings: Settings, offer: dict[str, str],
              target: Path, *, verbatim: bool, source_host: str) -> qemu_img.DiskInfo | None:
    """Read an announced export into ``target`` on this host (all or nothing)."""
    here = settings.host
    objects = _tls_objects(settings, offer, source_host)
    fixed = offer.get(xfer.FIXED) == "1" and not verbatim
    needed = int(offer[xfer.VIRTUAL_SIZE]) if fixed else int(offer[xfer.ALLOCATED])
    available = free_space(target.parent)
    if available < needed:
        raise DiskError(f"Host {here} has {available} bytes free; the copy "
                        f"needs {needed}", hresults.DISK_FULL)
    name = offer[xfer.EXPORT]
    spec = nbd.client_spec(offer[xfer.ADDRESS], int(offer[xfer.PORT]), name,
                           tls=bool(objects))
    started = time.monotonic()
    try:
        return qemu_img.pull(spec, target, context, virtual_size=int(offer[xfer.VIRTUAL_SIZE]),
                             fixed=fixed, verbatim=verbatim,
                             stall_seconds=settings.transfer_stall_seconds, objects=objects)
    except OperationFailed as exc:
        # The export name is the only key to the export: keep it out of the record.
        text = str(exc).replace(name, "***")
        if isinstance(exc, Cancelled):
            raise
        failed = PeerFailed(f"Copying from {source_host} failed after "
                            f"{time.monotonic() - started:.1f} s: {text}", exc.result,
                            exc.hresult)
        raise failed from None


def _export_answers(offer: dict[str, str]) -> bool:
    try:
        with socket.create_connection((offer[xfer.ADDRESS], int(offer[xfer.PORT])),
                                      timeout=2.0):
            return True
    except OSError:
        return False


def pull_and_judge(run: TaskRun, context: OperationContext, offer: dict[str, str],
                   target: Path, *, verbatim: bool, source_host: str,
                   server_task_id: str) -> qemu_img.DiskInfo | None:
    """`pull_from` (progress reported to ``context``); when it fails and the export no
    longer answers, the source's fate names the failure: a source worker that died
    (killed, or its host lost) ends the pull ThreadCrashError, not an I/O error.
    Its serve is judged gone once its lease lapses, so this waits up to one lease.

    A pull that stalled (received nothing) while the source host stays live in Redis
    met a partition between the two hosts: TimeOutError, whatever the serve's lease
    did meanwhile.  A lapse of that one lease (a late renewal on a busy host, which
    the renewer takes back, or a reaper's judgment of it) says nothing of the link."""
    try:
        return pull_from(context, run.settings, offer, target, verbatim=verbatim,
                         source_host=source_host)
    except PeerFailed as failure:
        if _export_answers(offer):
            raise
        stalled = failure.result is VMTaskResult.TimeOutError
        deadline = time.monotonic() + run.settings.lease_seconds + 1.0
        while time.monotonic() < deadline:
            peer = run.ride_out(lambda: read_peer(run.redis, server_task_id),
                                "reading the source's task")
            # Gone, or already judged so by a producer or a reaper.
            if ((peer.gone or peer.result is VMTaskResult.ThreadCrashError)
                    and not (stalled and _host_live(run, source_host))):
                raise PeerFailed(f"The worker of the source host {source_host} died "
                                 f"mid-transfer ({failure})", VMTaskResult.ThreadCrashError,
                                 hresults.SERVER_FAULT) from None
            if peer.final and peer.result is not VMTaskResult.ThreadCrashError:
                break
            run.sleep(WATCH_INTERVAL)
        raise


def _host_live(run: TaskRun, host: str) -> bool:
    return bool(run.ride_out(lambda: run.redis.exists(keys.host_heartbeat(host)),
                             f"reading the heartbeat of {host}"))


@operation(tasks.DISK_COPY_IN)
def copy_in(run: TaskRun, source_host: str, path: str, destination: str, transfer_id: str,
            server_task_id: str) -> dict[str, Any]:
    del path  # for the record's description; the source host resolves it
    files = HostFiles.of(run.settings)
    target = files.resolve_output(destination)
    if os.path.lexists(target):
        raise DiskError(f"{destination} already exists on {run.settings.host}",
                        hresults.FILE_EXISTS)
    with files.file_locks([], [target]):
        run.ride_out(lambda: run.redis.set(keys.transfer_accepted(transfer_id), "1",
                                           ex=OFFER_TTL_SECONDS), "accepting the copy")
        offer = _wait_for_offer(run, transfer_id, server_task_id, source_host)
        made = pull_and_judge(run, run, offer, target, verbatim=False,
                              source_host=source_host, server_task_id=server_task_id)
    return files.describe(target, made)
