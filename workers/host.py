"""The host's presence in Redis: heartbeat, crashed-task reaper, start-up hooks.

Runs in the worker's main process (``worker_ready`` .. ``worker_shutdown``).  The
reaper ends tasks whose lease expired, on any host: it is how a task orphaned by a
dead worker ends ThreadCrashError even when no producer is watching it.  (A
producer reading the task judges it too, so this holds with no worker alive.)
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
from api.protocol import keys, records, scripts
from api.replication import register_script
from api.settings import Settings
from api.store import judge_crashed, trim_recent
from workers.resend import LostMessageCheck
from workers.runtime import worker_identity

log = logging.getLogger(__name__)

Hook = Callable[[redis.Redis, Settings], None]


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
                 on_takeover: Callable[[redis.Redis, str, float], None] | None = None) -> None:
        self.settings = settings
        self.hooks = hooks
        self.on_crash_judged = on_crash_judged
        self.on_takeover = on_takeover
        self.client = settings.endpoint.client(settings.redis_timeout_seconds,
                                               decode_responses=True)
        self.finish = register_script(self.client, records.FINISH_SCRIPT)
        self.withdraw = register_script(self.client, scripts.load("host_withdraw"))
        self.primary_seen = register_script(self.client, scripts.load("redis_primary"))
        self.identity = worker_identity(settings)
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
        # A running task's lease names the host holding it ("host:machine:pid").
        running = sorted(self.client.smembers(keys.RUNNING_TASKS))
        holders = self.client.mget([keys.task_lease(t) for t in running]) if running else []
        status["tasks_running"] = sum(
            1 for h in holders if h and h.startswith(f"{self.settings.host}:"))
        for provider in self.hooks.status:
            status.update(provider(self.client, self.settings))
        return status

    def beat(self) -> None:
        """Refresh the host's heartbeat and this worker's own presence in it.

        Several workers may serve one host; each refreshes the shared heartbeat, so
        the host stays live while any of them is.
        """
        ttl = self.settings.heartbeat_seconds
        pipe = self.client.pipeline(transaction=True)
        pipe.set(keys.host_heartbeat(self.settings.host), json.dumps(self.status()),
                 px=int(ttl * 1000))
        pipe.zadd(keys.host_workers(self.settings.host), {self.identity: time.time() + ttl})
        pipe.expire(keys.host_workers(self.settings.host), int(ttl) + 1)
        pipe.sadd(keys.KNOWN_HOSTS, self.settings.host)
        pipe.execute()
        # Which Redis primary this is: a new one (a failover) restarts the crash bound,
        # and may have lost a message in the switch (`workers.resend`).
        age, since, replid = self.primary_seen(keys=[keys.REDIS_PRIMARY])
        if int(since) and self.on_takeover is not None:
            try:
                self.on_takeover(self.client, f"{replid}:{since}", float(age))
            except Exception:
                log.exception("Checking for messages lost in the switch of Redis primary "
                              "failed; the next beat tries again")

    def reap(self) -> None:
        running = sorted(self.client.smembers(keys.RUNNING_TASKS))
        if not running:
            return
        pipe = self.client.pipeline(transaction=False)
        for task_id in running:
            pipe.exists(keys.task_lease(task_id))
        for task_id, leased in zip(running, pipe.execute(), strict=True):
            if not leased and judge_crashed(self.client, self.finish, task_id,
                                            int(self.settings.retention_seconds),
                                            self.settings.lease_seconds):
                log.error("Task %s lost its worker: ended ThreadCrashError", task_id)
                if self.on_crash_judged is not None:
                    self.on_crash_judged(task_id)

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.beat()
                self.reap()
                trim_recent(self.client, self.settings.retention_seconds)
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
            self.withdraw(
                keys=[keys.host_heartbeat(self.settings.host),
                      keys.host_workers(self.settings.host)],
                args=[self.identity, repr(time.time())],
            )
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

        beacon = HostBeacon(settings, hooks, None, LostMessageCheck(app, settings))

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
