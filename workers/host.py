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
from collections.abc import Callable
from typing import Any

import redis
from celery.signals import worker_ready, worker_shutdown

from api.protocol import keys, records
from api.store import judge_crashed
from workers.app import settings

log = logging.getLogger(__name__)

# Engines register cleanups to run once when a worker starts, e.g. removing the
# temporary files of tasks that crashed on this host.
startup_hooks: list[Callable[[redis.Redis], None]] = []
# Engines run a check on every beat, e.g. noticing VMs that stopped by themselves.
tick_hooks: list[Callable[[redis.Redis], None]] = []
# Engines contribute counters to the heartbeat, e.g. the number of running VMs.
status_providers: list[Callable[[redis.Redis], dict[str, Any]]] = []


class HostBeacon:
    def __init__(self) -> None:
        self.client = redis.Redis.from_url(
            settings.redis_url, decode_responses=True, socket_connect_timeout=5
        )
        self.finish = self.client.register_script(records.FINISH_SCRIPT)
        self.started = time.time()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="vmtask-host", daemon=True)

    def status(self) -> dict[str, Any]:
        root = settings.storage_root
        usage = shutil.disk_usage(root) if root.exists() else None
        status: dict[str, Any] = {
            "host": settings.host,
            "machine": socket.gethostname(),
            "pid": os.getpid(),
            "started": self.started,
            "heartbeat": time.time(),
            "storage_root": str(root),
            "storage_free_bytes": usage.free if usage else None,
        }
        # A running task's lease names the host holding it ("host:machine:pid").
        running = sorted(self.client.smembers(keys.RUNNING_TASKS))
        holders = self.client.mget([keys.task_lease(t) for t in running]) if running else []
        status["tasks_running"] = sum(
            1 for h in holders if h and h.startswith(f"{settings.host}:"))
        for provider in status_providers:
            status.update(provider(self.client))
        return status

    def beat(self) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.set(keys.host_heartbeat(settings.host), json.dumps(self.status()),
                 px=int(settings.heartbeat_seconds * 1000))
        pipe.sadd(keys.KNOWN_HOSTS, settings.host)
        pipe.execute()

    def reap(self) -> None:
        running = sorted(self.client.smembers(keys.RUNNING_TASKS))
        if not running:
            return
        pipe = self.client.pipeline(transaction=False)
        for task_id in running:
            pipe.exists(keys.task_lease(task_id))
        for task_id, leased in zip(running, pipe.execute(), strict=True):
            if not leased and judge_crashed(self.client, self.finish, task_id,
                                            int(settings.retention_seconds)):
                log.error("Task %s lost its worker: ended ThreadCrashError", task_id)

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.beat()
                self.reap()
                for hook in tick_hooks:
                    hook(self.client)
            except redis.RedisError as exc:
                log.warning("Host heartbeat failed: %s", exc)
            except Exception:
                log.exception("A host check failed")
            self.stopping.wait(settings.heartbeat_seconds / 3)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        try:
            self.client.delete(keys.host_heartbeat(settings.host))
        except redis.RedisError as exc:
            log.warning("Could not withdraw the host heartbeat: %s", exc)


_beacon: HostBeacon | None = None


@worker_ready.connect
def _on_worker_ready(**_: object) -> None:
    global _beacon
    settings.storage_root.mkdir(parents=True, exist_ok=True)
    beacon = HostBeacon()
    for hook in startup_hooks:
        try:
            hook(beacon.client)
        except Exception:
            log.exception("Start-up hook %s failed", hook)
    beacon.beat()
    beacon.thread.start()
    _beacon = beacon
    log.info("vmtask host %s serving %s", settings.host, keys.host_queue(settings.host))


@worker_shutdown.connect
def _on_worker_shutdown(**_: object) -> None:
    if _beacon is not None:
        _beacon.stop()
