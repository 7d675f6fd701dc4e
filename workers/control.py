"""The control lane: quick operations never wait behind long ones.

Long operations (copies, VM starts, saves) can hold every slot of a host's main
worker for hours.  Quick ones (pause, resume, reset, turn off, disk info, delete)
go to their own queue, ``host.<name>.control``, which a second Celery worker of
the same host consumes with a thread pool: they wait on QMP or ``qemu-img info``,
not on the CPU, and each bounds its own waits.  The main worker starts that
worker when it is ready and stops it when it stops; the lane dies with the main
worker even on kill -9 (the parent-death signal), so a host never runs a lane
without its heartbeat.  The main worker consumes the control queue as well, so a
deployment without the lane still serves quick operations when a slot is free.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from api.protocol import keys
from api.settings import Settings

log = logging.getLogger(__name__)

# setpriv (util-linux, essential on Debian) sets the parent-death signal.
_DIE_WITH_PARENT: list[str] = (
    ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
)
STOP_GRACE_SECONDS = 10.0


def lane_argv(settings: Settings, node_name: str, loglevel: str) -> list[str]:
    return [
        *_DIE_WITH_PARENT, sys.executable, "-m", "celery", "-A", "workers", "worker",
        "--pool", "threads", "--concurrency", str(settings.control_concurrency),
        "--queues", keys.control_queue(settings.host),
        "--hostname", f"control-{node_name}", "--loglevel", loglevel,
        "--without-gossip", "--without-mingle",
    ]


def install(app: Celery, settings: Settings) -> None:
    lanes: list[subprocess.Popen[bytes]] = []

    def on_ready(sender: Any = None, **_: object) -> None:
        if getattr(sender, "app", app) is not app:
            return
        node_name = str(getattr(sender, "hostname", "") or f"{settings.host}@localhost")
        loglevel = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        env = {**os.environ, "VMTASK_WORKER_ROLE": "control"}
        lanes.append(subprocess.Popen(lane_argv(settings, node_name, str(loglevel)), env=env))
        log.info("Control lane for %s started (pid %d)", settings.host, lanes[-1].pid)

    def on_shutdown(sender: Any = None, **_: object) -> None:
        while lanes:
            lane = lanes.pop()
            lane.terminate()
            try:
                lane.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                lane.kill()
                lane.wait()

    worker_ready.connect(on_ready, weak=False)
    worker_shutdown.connect(on_shutdown, weak=False)
