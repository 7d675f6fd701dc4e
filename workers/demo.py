"""The README's demo: a private Redis and worker, real operations with live progress."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from api.enums import VMTaskResult
from api.records import TaskSnapshot
from api.server import VirtualServer
from api.task import VMTask
from workers.sandbox import RedisServer, WorkerProcess

DEMO_HOST = "demo"


def run_demo(workdir: Path, console: Console,
             follow: Callable[[VMTask], TaskSnapshot]) -> None:
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    redis: RedisServer | None = None
    url = os.environ.get("VMTASK_REDIS_URL")
    if not url:
        redis = RedisServer(workdir / "redis").start()
        url = redis.url
        console.print(f"started a private redis-server on port {redis.port}")
    worker = WorkerProcess(url, DEMO_HOST, workdir / "storage", workdir, concurrency=2,
                           include=())
    try:
        worker.start()
        console.print(f"started a worker for host '{DEMO_HOST}' (log: {worker.log_path})")
        with VirtualServer(url, host=DEMO_HOST, poll_interval=0.5) as server:
            console.print(f"live hosts: {server.hosts}")
            steps: list[tuple[str, Callable[[], VMTask]]] = [
                ("diagnostic ping, 2 s in 20 steps", lambda: server.ping(2000, 20)),
            ]
            for title, start in steps:
                console.rule(title)
                snap = follow(start())
                colour = "green" if snap.result is VMTaskResult.Success else "red"
                console.print(f"[{colour}]{snap.description}: "
                              f"{snap.result.name if snap.result is not None else '?'}"
                              f"[/{colour}]", highlight=False)
            console.rule("cancelling a running task")
            task = server.ping(60_000, 600)
            while task.percent_completed < 3:
                task.wait_for_completion(100)
            task.cancel()
            snap = follow(task)
            console.print(f"cancelled: result={snap.result.name if snap.result else None} "
                          f"error=0x{snap.error:08X}")
    finally:
        worker.stop()
        if redis is not None:
            redis.stop()
