"""Local real processes for the demo, tests and benchmarks: redis-server, workers.

Nothing here talks to a Redis it did not start.  Every wait is a condition polled
against a deadline; every process is stopped (its whole process group) on exit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import redis

from api.protocol import keys

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_TASK_MODULE = "tests.worker_tasks"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.02
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def stop_process_group(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)  # the main process; it stops its own pool
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers, e.g. pool children
    except ProcessLookupError:
        pass
    proc.wait()


class RedisServer:
    """A redis-server of our own on a free port; stop() and start() keep the port."""

    def __init__(self, directory: Path, *, appendonly: bool = False,
                 password: str | None = None) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.appendonly = appendonly
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True)

    def start(self) -> RedisServer:
        args = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "yes" if self.appendonly else "no",
            "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log"),
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, start_new_session=True)

        def ready() -> bool:
            try:
                return bool(self.client().ping())
            except redis.ConnectionError:
                return False

        wait_until(ready, 20, f"redis-server on port {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)
            self.proc = None


class WorkerProcess:
    """A real ``celery -A workers worker`` serving one host."""

    def __init__(self, redis_url: str, host: str, storage_root: Path, log_dir: Path, *,
                 concurrency: int = 2, env: Mapping[str, str] | None = None,
                 include: tuple[str, ...] = (TEST_TASK_MODULE,),
                 node_name: str | None = "") -> None:
        self.redis_url = redis_url
        self.host = host
        self.storage_root = storage_root
        self.concurrency = concurrency
        self.extra_env = dict(env or {})
        self.include = include
        # "": a unique name carrying the host; None: no -n, Celery's default naming.
        self.node_name = node_name
        self.log_path = log_dir / f"worker-{host}-{uuid.uuid4().hex[:6]}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "VMTASK_REDIS_URL": self.redis_url,
            "VMTASK_HOST": self.host,
            "VMTASK_STORAGE_ROOT": str(self.storage_root),
            "VMTASK_ACCEL": "tcg",
            "PYTHONPATH": str(REPO_ROOT),
        })
        env.update(self.extra_env)
        return env

    def node_arguments(self) -> list[str]:
        if self.node_name is None:
            return []
        return ["-n", self.node_name or f"{self.host}-{uuid.uuid4().hex[:6]}@%h"]

    def start(self, wait: bool = True) -> WorkerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers", "worker",
             "--loglevel", "INFO", "--pool", "prefork", "-c", str(self.concurrency),
             *self.node_arguments(),
             *(["--include", ",".join(self.include)] if self.include else []),
             "--without-gossip", "--without-mingle"],
            cwd=REPO_ROOT, env=self.environment(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        if wait:
            self.wait_ready()
        return self

    def heartbeat(self) -> dict[str, Any] | None:
        try:
            raw = redis.Redis.from_url(self.redis_url).get(keys.host_heartbeat(self.host))
        except redis.ConnectionError:
            return None
        return json.loads(raw) if raw else None

    def wait_ready(self, timeout: float = 60) -> None:
        assert self.proc is not None

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log()}")
            beat = self.heartbeat()
            return beat is not None and beat.get("pid") == self.proc.pid  # type: ignore[union-attr]

        wait_until(ready, timeout, f"worker for host {self.host}", interval=0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def child_pids(self) -> list[int]:
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-g", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split() if int(p) != self.proc.pid]

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)
            self.proc = None

    def kill(self) -> None:
        """kill -9 the worker and its pool: nothing gets to clean up."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None
