"""Live migration with local disks, libvirt's ``--copy-storage-all`` sequence in QMP.

Destination (`start_incoming`): a QEMU with the same configuration on fresh disks,
started with ``-incoming defer`` and ``-S`` (it never runs the guest before it is
told to), an NBD server on the advertised address exporting each disk writable
under a one-time name, and ``migrate-incoming`` on a TCP port of the same range.

Source (`Outgoing`): an NBD client node per export, ``blockdev-mirror`` of each
disk ``disk{index}`` into it (sync full; sync top for a disk whose backing images
the destination already holds, copied beforehand: the running guest never writes
them, so only the top image is mirrored and the chain arrives as it is),
``migrate`` once every mirror is ready, then ``block-job-cancel`` of the ready
mirrors once the migration has completed: a ready mirror cancelled after the guest
stopped leaves the target a consistent copy.  Until the destination's ``cont`` the
source can always take the guest back (`Outgoing.rollback`): the destination never
ran it.

With the host's transfer credentials (`workers.engines.transfer_tls`: x509 or a
pre-shared key) both channels, NBD and migration, are TLS on both QEMUs.

Nothing here talks to Redis: the task layer says when to switch over or give up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from api.protocol.formats import MiB
from workers.engines.context import NullContext, OperationContext, ProgressSpan
from workers.engines.nbd import port_free
from workers.engines.qemu_vm.accel import choose_accel
from workers.engines.qemu_vm.config import VMConfig, VMPaths
from workers.engines.qemu_vm.lifecycle import (
    OpenedFiles,
    build_argv,
    check_host_memory,
    launch,
)
from workers.engines.qemu_vm.monitor import Monitor, connect
from workers.engines.qemu_vm.process import POLL_INTERVAL, cleanup, find_pid, force_stop
from workers.engines.qemu_vm.savestate import UNLIMITED_BANDWIDTH, cancel_migration
from workers.engines.transfer_tls import TransferCreds
from workers.failures import (
    Cancelled,
    IllegalValue,
    OperationFailed,
    OperationTimedOut,
    QMPCommandFailed,
)

# QEMU's default: the guest's pause at switch-over is planned to stay under this.
DOWNTIME_LIMIT_MS = 300
MIRRORABLE_FORMATS = frozenset({"qcow2", "raw"})
STOP_TIMEOUT = 30.0
TLS_ID = "vmtask-migration-tls"
# query-migrate's statuses of a migration still under way.
ACTIVE = frozenset({"setup", "active", "pre-switchover", "device", "wait-unplug",
                    "postcopy-active", "cancelling"})


def new_export_name() -> str:
    """A one-time export name; QEMU also uses it as the export's id, which must start
    with a letter."""
    return "x" + secrets.token_urlsafe(24)


def device_of(index: int) -> str:
    """The block device of disk ``index``: QEMU's drive id, the same on both hosts."""
    return f"disk{index}"


@dataclass(frozen=True)
class Incoming:
    """Where a prepared destination listens: what the source needs, nothing more."""

    address: str
    nbd_port: int
    migrate_port: int
    exports: tuple[str, ...]
    """One-time export name of disk ``index``, by index."""

    def to_dict(self) -> dict[str, Any]:
        return {"address": self.address, "nbd_port": self.nbd_port,
                "migrate_port": self.migrate_port, "exports": list(self.exports)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Incoming:
        return cls(str(data["address"]), int(data["nbd_port"]), int(data["migrate_port"]),
                   tuple(str(e) for e in data["exports"]))


def _ports(address: str, ports: tuple[int, int]) -> list[int]:
    low, high = ports
    candidates = list(range(low, high + 1))
    random.shuffle(candidates)  # concurrent migrations rarely race for one port
    return [p for p in candidates if port_free(address, p)]


def _inet(address: str, port: int) -> dict[str, Any]:
    return {"type": "inet", "data": {"host": address, "port": str(port)}}


def _uri(address: str, port: int) -> str:
    return f"tcp:[{address}]:{port}" if ":" in address else f"tcp:{address}:{port}"


def _add_creds(monitor: Monitor, creds: TransferCreds | None, endpoint: str
               ) -> dict[str, str]:
    """The host's transfer credentials in QEMU; the arguments that use them."""
    if creds is None:
        return {}
    # A migration undone before its own cleanup ran (its worker killed early) may
    # have left its object behind: a second object-add of the id would fail.
    with contextlib.suppress(QMPCommandFailed):
        monitor.execute("object-del", {"id": TLS_ID})
    monitor.execute("object-add", creds.qmp_object(TLS_ID, endpoint))
    return {"tls-creds": TLS_ID}


def _drop_creds(monitor: Monitor) -> None:
    """Forget the TLS credentials: this QEMU's next migration adds its own afresh."""
    monitor.execute("migrate-set-parameters", {"tls-creds": ""})
    with contextlib.suppress(QMPCommandFailed):
        monitor.execute("object-del", {"id": TLS_ID})


def start_incoming(config: VMConfig, paths: VMPaths, context: OperationContext, *,
                   address: str, ports: tuple[int, int], exports: tuple[str, ...],
                   creds: TransferCreds | None = None, timeout: float = 60.0,
                   opened: OpenedFiles | None = None) -> Incoming:
    """Start the destination QEMU paused, waiting for the migration and the disks.

    ``config.disks`` are the (empty) destination images, each over its backing chain
    when it has one; ``opened`` hands them to QEMU by descriptor (`OpenedFiles`).
    With ``creds`` the NBD server and the migration accept only TLS clients holding
    matching credentials.
    On any failure no QEMU is left running; the caller removes the images.
    """
    deadline = time.monotonic() + timeout
    if find_pid(paths) is not None:
        raise OperationFailed(f"VM {config.name} already runs on this host")
    check_host_memory(config)
    paused = dataclasses.replace(config, extra_args=(*config.extra_args, "-S"))
    paths.directory.mkdir(parents=True, exist_ok=True)
    argv = build_argv(paused, paths, choose_accel(config.accel), incoming=True, opened=opened)
    launch(argv, paths, context, deadline, pass_fds=opened.fds if opened else ())
    try:
        with connect(paths, timeout=max(1.0, deadline - time.monotonic())) as monitor:
            tls = _add_creds(monitor, creds, "server")
            if tls:
                monitor.execute("migrate-set-parameters", tls)
            nbd_port = _listen(address, ports, lambda port: monitor.execute(
                "nbd-server-start", {"addr": _inet(address, port), **tls}))
            for index, name in enumerate(exports):
                monitor.execute("nbd-server-add", {"device": device_of(index), "name": name,
                                                   "writable": True})
            migrate_port = _listen(address, ports, lambda port: monitor.execute(
                "migrate-incoming", {"uri": _uri(address, port)}))
    except BaseException:
        force_stop(paths)
        cleanup(paths)
        raise
    return Incoming(address, nbd_port, migrate_port, exports)


def _listen(address: str, ports: tuple[int, int], bind: Callable[[int], object]) -> int:
    """The first port of the range ``bind`` succeeds on (QEMU listens on it)."""
    for port in _ports(address, ports):
        try:
            bind(port)
        except QMPCommandFailed as exc:
            if "in use" in exc.qemu_description.lower():
                continue  # taken between the probe and QEMU's bind
            raise
        return port
    raise OperationFailed(f"No free transfer port in {ports[0]}-{ports[1]} on {address} "
                          "(VMTASK_TRANSFER_PORTS)")


def incoming_status(paths: VMPaths) -> str:
    """The destination's migration status ("active", "completed", "failed", ...)."""
    with connect(paths) as monitor:
        return str(monitor.execute("query-migrate").get("status", "none"))


def wait_incoming(monitor: Monitor, *, timeout: float = STOP_TIMEOUT) -> None:
    """Until the destination (``monitor``) has received and loaded the whole migration.

    The source reads "completed" once it has sent the last byte; this side is still
    "active" until it has read and loaded that byte, and for longer on a busy host.
    The wait is for local work only (the stream is already sent, at worst still in this
    host's socket buffers), hence one fixed bound.
    """
    deadline = time.monotonic() + timeout
    # No status yet: this QEMU has not yet taken the connection the kernel accepted.
    while (status := monitor.execute("query-migrate").get("status", "none")) in (
            ACTIVE | {"none"}):
        if time.monotonic() > deadline:
            raise OperationTimedOut(f"The incoming migration was still {status} {timeout:g} s "
                                    "after the source had sent all of it")
        time.sleep(POLL_INTERVAL / 5)
    if status != "completed":
        raise OperationFailed(f"The incoming migration is {status}, not completed")


def stop_serving(monitor: Monitor) -> None:
    """The source has let go: wait for the migration to arrive whole, then close the NBD
    server (``monitor``: the destination's QMP connection)."""
    wait_incoming(monitor)
    monitor.execute("nbd-server-stop")
    _drop_creds(monitor)


def run_guest(monitor: Monitor, *, run: bool) -> None:
    """Run the guest here (``cont``), or leave it paused as it was on the source."""
    if run:
        monitor.execute("cont")


@dataclass
class Outgoing:
    """The source side of one live migration, on an open QMP connection."""

    monitor: Monitor
    disks: int
    memory_bytes: int
    progress: ProgressSpan
    jobs: list[str] = dataclasses.field(default_factory=list)
    nodes: list[str] = dataclasses.field(default_factory=list)
    migrating: bool = False
    completed: bool = False
    was_running: bool = True
    max_bandwidth: int = 0
    """Bytes per second for each mirror and for RAM; 0: unlimited."""
    tls: dict[str, str] = dataclasses.field(default_factory=dict)
    disk_sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    stall_seconds: float = 0.0
    """Give up once no byte moved for this long (a partition stalls TCP for many
    minutes without failing it); 0: no bound."""
    below_bytes: int = 0
    """Bytes of the backing images copied to the destination before the mirrors."""
    below_done: float = 0.0
    """Their share copied so far, 0..1."""
    _moved: tuple[int, float] = (-1, 0.0)

    @classmethod
    def begin(cls, monitor: Monitor, config: VMConfig, context: OperationContext, *,
              max_bandwidth: int = 0, creds: TransferCreds | None = None,
              stall_seconds: float = 0.0) -> Outgoing:
        status = monitor.execute("query-status")["status"]
        if status not in ("running", "paused"):
            raise OperationFailed(f"VM {config.name} cannot migrate in the run state {status!r}")
        blockers = monitor.execute("query-migrate").get("blocked-reasons") or []
        if blockers:
            raise IllegalValue(f"VM {config.name} cannot migrate: {'; '.join(blockers)}")
        outgoing = cls(monitor, len(config.disks), config.memory_mb * MiB,
                       ProgressSpan(context, min_step=0.5))
        outgoing.was_running = status == "running"
        outgoing.max_bandwidth = max_bandwidth
        outgoing.stall_seconds = stall_seconds
        outgoing.tls = _add_creds(monitor, creds, "client")
        return outgoing

    def copied_below(self, fraction: float) -> None:
        """Progress of the backing images' copy (``fraction`` of `below_bytes`)."""
        self.below_done = max(self.below_done, min(1.0, fraction))
        self._report({}, None)

    def mirror(self, incoming: Incoming, syncs: tuple[str, ...] = ()) -> None:
        """Start mirroring every disk into the destination's exports: sync ``syncs[i]``
        ("full" or "top"), full by default."""
        self.below_done = 1.0
        for index, export in enumerate(incoming.exports):
            node = f"migrate-target{index}"
            self.monitor.execute("blockdev-add", {
                "driver": "nbd", "node-name": node, "export": export,
                "server": {"type": "inet", "host": incoming.address,
                           "port": str(incoming.nbd_port)}, **self.tls})
            self.nodes.append(node)
            job = f"migrate-mirror{index}"
            self.monitor.execute("blockdev-mirror", {
                "job-id": job, "device": device_of(index), "target": node,
                "sync": syncs[index] if syncs else "full",
                "auto-dismiss": False, "speed": self.max_bandwidth})
            self.jobs.append(job)

    def _job_table(self) -> dict[str, dict[str, Any]]:
        return {str(j["device"]): j for j in self.monitor.execute("query-block-jobs")}

    def _report(self, jobs: dict[str, dict[str, Any]], ram: dict[str, Any] | None) -> None:
        for name, job in jobs.items():
            self.disk_sizes[name] = max(int(job.get("len", 0)), self.disk_sizes.get(name, 0))
        disk_total = sum(self.disk_sizes.values())
        disk_done = sum(int(j.get("offset", 0)) for j in jobs.values())
        if self.migrating or self.completed:
            disk_done = disk_total  # ready mirrors only follow the guest's new writes
        ram_total, ram_done = self.memory_bytes, 0
        if ram and ram.get("total"):
            ram_total = int(ram["total"])
            ram_done = ram_total - int(ram.get("remaining", ram_total))
        if self.completed:
            ram_done = ram_total
        below = self.below_bytes * self.below_done
        total = max(1, self.below_bytes + disk_total + ram_total)
        self.progress.span(2, 97, (below + disk_done + ram_done) / total)

    def _check_stall(self, moved: int) -> None:
        """Raise once ``moved`` (bytes sent so far) stayed the same `stall_seconds`."""
        now = time.monotonic()
        if moved != self._moved[0]:
            self._moved = (moved, now)
        elif self.stall_seconds and now - self._moved[1] > self.stall_seconds:
            raise OperationTimedOut(f"The transfer to the destination stalled: nothing "
                                    f"moved for {self.stall_seconds:g} s")

    def wait_ready(self, context: OperationContext, should_stop: Callable[[], None],
                   deadline: float) -> None:
        """Until every mirror has caught up (BLOCK_JOB_READY)."""
        while True:
            jobs = self._job_table()
            self._report(jobs, None)
            for job in self.jobs:
                info = jobs.get(job)
                if info is None or info.get("status") in ("concluded", "aborting"):
                    raise OperationFailed(f"Mirroring {job} to the destination stopped: "
                                          f"{self._job_error(job)}")
            if all(jobs[j].get("ready") for j in self.jobs):
                return
            self._check_stall(sum(int(jobs[j].get("offset", 0)) for j in self.jobs))
            if context.cancel_requested():
                raise Cancelled()
            should_stop()
            if time.monotonic() > deadline:
                raise OperationTimedOut("The disks did not reach the destination in time")
            time.sleep(POLL_INTERVAL * 2)

    def _job_error(self, job: str) -> str:
        for info in self.monitor.execute("query-jobs"):
            if info.get("id") == job:
                return str(info.get("error") or info.get("status"))
        return "the job is gone"

    def migrate(self, incoming: Incoming, context: OperationContext,
                should_stop: Callable[[], None], deadline: float) -> dict[str, Any]:
        """RAM and device state to the destination; the final query-migrate once completed.

        A cancel that arrives after completion is still honoured by the caller's
        rollback: the destination has not run the guest yet.
        """
        self.monitor.execute("migrate-set-parameters", {
            "max-bandwidth": self.max_bandwidth or UNLIMITED_BANDWIDTH,
            "downtime-limit": DOWNTIME_LIMIT_MS, **self.tls})
        self.monitor.execute("migrate", {"uri": _uri(incoming.address, incoming.migrate_port)})
        self.migrating = True
        while True:
            info = self.monitor.execute("query-migrate")
            state = info.get("status")
            if state == "completed":
                self.completed = True
                self._report({}, info.get("ram"))
                return dict(info)
            if state in ("failed", "cancelled"):
                raise OperationFailed(f"The migration failed: {info.get('error-desc', state)}")
            self._report(self._job_table(), info.get("ram"))
            if state != "setup":
                self._check_stall(int((info.get("ram") or {}).get("transferred", 0)))
            if context.cancel_requested():
                raise Cancelled()
            should_stop()
            if time.monotonic() > deadline:
                raise OperationTimedOut("The migration did not converge in time")
            time.sleep(POLL_INTERVAL)

    def finish_mirrors(self, deadline: float) -> None:
        """Cancel the ready mirrors: the guest has stopped, so each target is complete."""
        for job in self.jobs:
            self.monitor.execute("block-job-cancel", {"device": job})
        self._reap_jobs(deadline, require_success=True)

    def _reap_jobs(self, deadline: float, *, require_success: bool) -> None:
        failures: list[str] = []
        pending = set(self.jobs)
        while pending:
            for info in self.monitor.execute("query-jobs"):
                if info.get("id") in pending and info.get("status") in ("concluded", "null"):
                    if info.get("error"):
                        failures.append(f"{info['id']}: {info['error']}")
                    with contextlib.suppress(QMPCommandFailed):
                        self.monitor.execute("job-dismiss", {"id": info["id"]})
                    pending.discard(str(info["id"]))
            present = {str(i.get("id")) for i in self.monitor.execute("query-jobs")}
            pending &= present
            if pending and time.monotonic() > deadline:
                raise OperationTimedOut(f"The mirror jobs {sorted(pending)} did not stop")
            if pending:
                time.sleep(POLL_INTERVAL / 5)
        self.jobs.clear()
        if failures and require_success:
            raise OperationFailed(f"Mirroring to the destination failed: {'; '.join(failures)}")

    def rollback(self) -> None:
        """Give the guest back to the source as it was: stop whatever is under way."""
        deadline = time.monotonic() + STOP_TIMEOUT
        if self.migrating:
            with contextlib.suppress(OperationFailed):
                if cancel_migration(self.monitor, deadline) == "completed":
                    self.completed = True
        for node in self.nodes:
            # Fail the NBD client's requests at once: across a partition they would
            # hold the cancelled mirror until TCP gives up, many minutes later.
            with contextlib.suppress(QMPCommandFailed):
                self.monitor.execute("yank", {"instances": [{"type": "block-node",
                                                             "node-name": node}]})
        for job in self.jobs:
            with contextlib.suppress(QMPCommandFailed):
                self.monitor.execute("block-job-cancel", {"device": job, "force": True})
        self._reap_jobs(deadline, require_success=False)
        for node in self.nodes:
            with contextlib.suppress(QMPCommandFailed):
                self.monitor.execute("blockdev-del", {"node-name": node})
        self.nodes.clear()
        _drop_creds(self.monitor)
        if self.completed:
            # A completed migration stopped the guest and let go of its disks;
            # `cont` takes them back.  A paused guest runs for this instant only.
            self.monitor.execute("cont")
            if not self.was_running:
                self.monitor.execute("stop")
        self.migrating = False


def abandon_outgoing(paths: VMPaths, *, running: bool) -> bool:
    """Take the guest back from a migration whose driving worker died; True if there
    was one.  Whatever QEMU still runs or finished of it (mirror jobs, NBD client
    nodes, the migration) is stopped; a guest stopped by a completed migration runs
    again (``running``) or stays paused.  Only for a VM the registry still places
    here: the destination never runs a guest the record does not name it for.
    """
    with connect(paths) as monitor:
        status = monitor.execute("query-migrate").get("status", "none")
        jobs = [str(j["id"]) for j in monitor.execute("query-jobs")
                if str(j.get("id", "")).startswith("migrate-mirror")]
        nodes = sorted({str(n["node-name"]) for n in monitor.execute("query-named-block-nodes")
                        if str(n.get("node-name", "")).startswith("migrate-target")})
        run_state = monitor.execute("query-status")["status"]
        if not jobs and not nodes and run_state != "postmigrate" and status not in ACTIVE:
            return False
        outgoing = Outgoing(monitor, 0, 0, ProgressSpan(NullContext()), jobs=jobs, nodes=nodes,
                            migrating=status in ACTIVE, completed=run_state == "postmigrate",
                            was_running=running)
        outgoing.rollback()
    return True


def finish_incoming(paths: VMPaths, *, running: bool) -> bool:
    """Run the guest of a migration received here whose worker died between the
    switch-over and its ``cont``; True if there was one.  The guest is left as it
    was on the source: running (``running``) or paused.  Only for a VM the registry
    places here: the switch-over is what let this host's QEMU have it.
    """
    with connect(paths) as monitor:
        if monitor.execute("query-status")["status"] != "paused":
            return False  # never received (inmigrate), or already run
        wait_incoming(monitor, timeout=5.0)  # the switch-over waited for it: at once
        with contextlib.suppress(QMPCommandFailed):
            monitor.execute("nbd-server-stop")  # already stopped, unless it died before
        _drop_creds(monitor)
        run_guest(monitor, run=running)
    return True
