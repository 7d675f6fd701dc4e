"""The host's presence in Redis: heartbeat, crashed-task reaper, start-up hooks.

Runs in the worker's main process (``worker_ready`` .. ``worker_shutdown``).  The
reaper ends tasks whose lease expired, on any host: it is how a task orphaned by a
dead worker ends ThreadCrashError even when no producer is watching it.  (A
producer reading the task judges it too, so this holds with no worker alive.)

What one beat costs Redis, with N hosts and T running tasks in the fleet (issue 27:
a host's background cost must not grow with the rest of the fleet):

- heartbeat and presence: O(1) (one MULTI, and the primary check: one script);
- status counters: O(own): the host's running set (SCARD, kept by the start and
  finish scripts) and its own VM records (`keys.host_vms`);
- VM watch (the tick hooks): O(own VMs), through the host's VM set;
- reaping: O(log T + due), the due end of the lease deadlines
  (`lua/lease_due.lua`): every host reads it, no host reads a live lease of
  another, so a host that died for good still has its tasks judged within a beat
  of their lease running out;
- workers of this host gone: O(own workers) (the host's worker set);
- duties, one SET NX per beat each: trimming the recent-task index (O(log n +
  removed), once per beat period fleet-wide, by whoever holds the duty) and the
  lost-message sweep (O(PENDING past the grace), once per `SWEEP_SECONDS`
  fleet-wide).  The holder's beat pays for the fleet, once for all hosts;
- the lost-message check after a failover or a gone worker: O(fleet PENDING past
  the grace), per event, never per beat.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from api import events
from api.protocol import keys
from api.protocol.records import Field, judge_crashed, trim_recent
from api.replication import pipelined
from api.scripts import Scripts
from api.settings import Settings
from workers.resend import SWEEP_SECONDS, LostMessageCheck, LostMessageWatch
from workers.runtime import worker_identity

log = logging.getLogger(__name__)

Hook = Callable[[redis.Redis, Settings], None]

# How many due leases one beat judges at most (the rest on the next beats).
REAP_BATCH = 100


@dataclass(frozen=True)
class HostHooks:
    """What the operation modules ask of the host's main process; given to `install`."""

    startup: Sequence[Hook] = ()
    """Run once when the worker starts, e.g. removing the temporaries of crashed tasks."""
    tick: Sequence[Hook] = ()
    """Run on every beat, e.g. noticing VMs that stopped by themselves."""
    status: Sequence[Callable[[redis.Redis, Settings], dict[str, Any]]] = ()
    """Counters for the heartbeat, e.g. the number of running VMs."""


class HostBeacon:
    def __init__(self, settings: Settings, hooks: HostHooks,
                 on_crash_judged: Callable[[str], None] | None = None,
                 on_takeover: Callable[[redis.Redis, str, float], None] | None = None,
                 lost: LostMessageWatch | None = None) -> None:
        self.settings = settings
        self.hooks = hooks
        self.on_crash_judged = on_crash_judged
        self.on_takeover = on_takeover
        self.lost = lost
        self.client = settings.endpoint.client(settings.redis_timeout_seconds,
                                               decode_responses=True)
        self.scripts = Scripts.of(self.client)
        self.identity = worker_identity(settings)
        # What this beat's round trip found: due leases, and the duties it claimed.
        self.due: list[str] | None = None
        self.claimed: set[str] = set()
        self.started = time.time()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="vmtask-host", daemon=True)

    def status(self) -> dict[str, Any]:
        root = self.settings.storage_root
        usage = shutil.disk_usage(root) if root.exists() else None
        status: dict[str, Any] = {
            "host": self.settings.host,
            "machine": socket.gethostname(),
            "pid": os.getpid(),
            "started": self.started,
            "heartbeat": time.time(),
            "storage_root": str(root),
            "storage_free_bytes": usage.free if usage else None,
            # Where other hosts reach this host's transfers (disk copies, migrations).
            "transfer_address": self.settings.advertise_address,
            "transfer_ports": list(self.settings.transfer_ports),
        }
        # O(1): the host's own running set, kept by the start and finish scripts.
        status["tasks_running"] = self.client.scard(keys.host_running(self.settings.host))
        for provider in self.hooks.status:
            status.update(provider(self.client, self.settings))
        return status

    def beat(self) -> None:
        """Refresh the host's heartbeat and this worker's own presence in it.

        Several workers may serve one host; each refreshes the shared heartbeat, so
        the host stays live while any of them is.  One round trip (after the status
        counters) carries everything a beat asks of Redis: the host's lapsed
        workers, the heartbeat and presence, which primary this is, the due end of
        the lease deadlines and the claims of the fleet-wide duties.
        """
        ttl = self.settings.heartbeat_seconds
        status = json.dumps(self.status())
        now = time.time()
        workers = keys.host_workers(self.settings.host)
        duties = {"trim": self.settings.heartbeat_seconds / 3, "sweep": SWEEP_SECONDS}

        def build(pipe: Any) -> None:
            pipe.zrangebyscore(workers, "-inf", now)  # lapsed: before our own renewal
            # Presence before heartbeat: a withdrawing worker (host_withdraw.lua) that
            # runs between the two still finds us, and keeps the heartbeat.
            pipe.zadd(workers, {self.identity: now + ttl})
            pipe.expire(workers, int(ttl) + 1)
            pipe.set(keys.host_heartbeat(self.settings.host), status, px=int(ttl * 1000))
            pipe.sadd(keys.KNOWN_HOSTS, self.settings.host)
            self.scripts.redis_primary.queue(pipe, primary=keys.REDIS_PRIMARY)
            self.scripts.lease_due.queue(pipe, deadlines=keys.LEASE_DEADLINES,
                                         limit=REAP_BATCH)
            for name, period in duties.items():
                pipe.set(f"{keys.DUTY_PREFIX}{name}", self.identity, nx=True,
                         px=max(1, int(period * 1000)))

        replies = pipelined(self.client, build, self.scripts, transaction=True)
        lapsed, (age, since, replid), due, claims = (
            replies[0], replies[5], replies[6], replies[7:])
        self.due = [str(task_id) for task_id in due]
        self.claimed = {name for name, won in zip(duties, claims, strict=True) if won}
        self.notice_gone_workers([str(identity) for identity in lapsed])
        # Which Redis primary this is: a new one (a failover) restarts the crash bound,
        # and may have lost a message in the switch (`workers.resend`).
        if int(since) and self.on_takeover is not None:
            try:
                self.on_takeover(self.client, f"{replid}:{since}", float(age))
            except Exception:
                log.exception("Checking for messages lost in the switch of Redis primary "
                              "failed; the next beat tries again")

    def notice_gone_workers(self, lapsed: list[str]) -> None:
        """A worker of this host whose presence lapsed (killed, frozen) may have taken
        a message to its grave: check the host's PENDING tasks.  O(own workers)."""
        if self.lost is None:
            return
        workers = keys.host_workers(self.settings.host)
        for identity in lapsed:
            if identity != self.identity and self.client.zrem(workers, identity):
                log.warning("Worker %s of host %s is gone (its presence lapsed)",
                            identity, self.settings.host)
                self.lost.schedule(self.settings.host)

    def reap(self) -> None:
        """Judge the tasks whose lease ran out, of any host: O(log T + due).

        Only the due end of the lease deadlines is read; the finish script checks
        the lease itself, atomically, so a deadline renewed meanwhile judges nothing.
        """
        due, self.due = self.due, None  # read by this beat's round trip
        if due is None:
            due = self.scripts.lease_due(deadlines=keys.LEASE_DEADLINES, limit=REAP_BATCH)
        for task_id in due:
            if judge_crashed(self.scripts, task_id,
                             int(self.settings.retention_seconds), self.settings.lease_seconds):
                log.error("Task %s lost its worker: ended ThreadCrashError", task_id)
                if self.on_crash_judged is not None:
                    self.on_crash_judged(task_id)
                # Its worker died: it may have died holding a message, too.
                host = self.client.hget(keys.task_record(task_id), Field.HOST)
                if host and self.lost is not None:
                    self.lost.schedule(host)

    def duties(self) -> None:
        """The fleet-wide duties this beat claimed (one SET NX each in the beat's
        round trip, expiring after the duty's period: each duty runs once per period
        across all hosts), and the checks scheduled after a worker was judged gone."""
        claimed, self.claimed = self.claimed, set()
        # Trimming the recent-task index: O(log n + removed), by one worker per beat
        # period for the whole fleet (a submit never pays for it).
        if "trim" in claimed:
            trim_recent(self.client, self.settings.retention_seconds)
        if self.lost is not None:
            self.lost.run_due(self.client)
            if "sweep" in claimed:
                self.lost.sweep(self.client)

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.beat()
                self.reap()
                self.duties()
                for hook in self.hooks.tick:
                    hook(self.client, self.settings)
            except redis.RedisError as exc:
                log.warning("Host heartbeat failed: %s", exc)
            except Exception:
                log.exception("A host check failed")
            self.stopping.wait(self.settings.heartbeat_seconds / 3)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        try:
            self.scripts.host_withdraw(heartbeat=keys.host_heartbeat(self.settings.host),
                                       workers=keys.host_workers(self.settings.host),
                                       worker=self.identity, now=repr(time.time()))
        except redis.RedisError as exc:
            log.warning("Could not withdraw the host heartbeat: %s", exc)


def install(app: Celery, settings: Settings, hooks: HostHooks) -> None:
    """Run the host's presence in ``app``'s worker: from ready to shutdown."""
    beacons: list[HostBeacon] = []

    def on_ready(sender: Any = None, **_: object) -> None:
        if getattr(sender, "app", app) is not app:
            return
        settings.storage_root.mkdir(parents=True, exist_ok=True)
        node = str(getattr(sender, "hostname", "") or settings.host)

        lost = LostMessageWatch(app)
        # This worker may replace one killed a moment ago, holding a message.
        lost.schedule(settings.host)
        beacon = HostBeacon(settings, hooks, None, LostMessageCheck(app, settings), lost)

        def announce_crash(task_id: str) -> None:
            events.announce_crash(app, beacon.client, task_id, judge=node)

        beacon.on_crash_judged = announce_crash
        for hook in hooks.startup:
            try:
                hook(beacon.client, settings)
            except Exception:
                log.exception("Start-up hook %s failed", hook)
        beacon.beat()
        beacon.thread.start()
        beacons.append(beacon)
        log.info("vmtask host %s serving %s", settings.host, keys.host_queue(settings.host))

    def on_shutdown(sender: Any = None, **_: object) -> None:
        while beacons:
            beacons.pop().stop()

    worker_ready.connect(on_ready, weak=False)
    worker_shutdown.connect(on_shutdown, weak=False)
