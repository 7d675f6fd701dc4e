"""Bare Celery, the baseline every queued benchmark compares against.

It runs as its own worker process, configured like vmtask's worker where a setting
changes the cost of a task and like stock Celery everywhere else:

    BENCH_REDIS_URL=redis://... celery -A bench.bare_app worker -E -P prefork -c 4 \\
        --prefetch-multiplier 1 --loglevel INFO --without-gossip --without-mingle

(`bench.common.BareWorker` starts it so.)  JSON only, Redis broker, Celery's own Redis
result backend, task events on, prefetch disabled as vmtask's worker has it.  No
import from ``api`` or ``workers``: the baseline must not pay for vmtask's code.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from celery import Celery

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = "bare"



def make_app(url: str) -> Celery:
    """The worker's app, and the benchmarks' client for it (stock producer settings)."""
    bare = Celery("bare", broker=url, backend=url, set_as_current=False)
    bare.conf.update(
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue=QUEUE,
        worker_send_task_events=True,
        # The same delivery settings as vmtask's worker (workers/factory.py): a slot
        # takes a message only when free, and acknowledges it when it starts.
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,
        task_acks_late=False,
        task_track_started=False,
        broker_connection_retry_on_startup=True,
    )
    return bare


app = make_app(URL)


@app.task(name="bare.noop")  # type: ignore[untyped-decorator]
def noop() -> None:
    """The no-op baseline for round trip, throughput and enqueue rate."""


@app.task(name="bare.stamp")  # type: ignore[untyped-decorator]
def stamp(delay: float = 0.0) -> float:
    """When the body ended (after ``delay``, so the caller is already waiting)."""
    if delay:
        time.sleep(delay)
    return time.time()


def fsync_path(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def convert_file(source: str, destination: str, source_fmt: str = "raw",
                 destination_fmt: str = "qcow2") -> None:
    """What vmtask's convert does to the files, and nothing else.

    The same qemu-img argv as workers/engines/qemu_img/rewrite.py (``-p`` included),
    into a temporary beside the target, then the same durability steps as its
    ``new_output``: fsync the file, rename it into place, fsync the directory.
    """
    target = Path(destination)
    temp = target.with_name(f".{target.name}.bare.tmp")
    subprocess.run(
        ["qemu-img", "convert", "-p", "-f", source_fmt, "-O", destination_fmt,
         source, str(temp)],
        check=True, capture_output=True, env={**os.environ, "LC_ALL": "C", "LANG": "C"},
    )
    fsync_path(temp)
    os.rename(temp, target)
    fsync_path(target.parent, directory=True)


@app.task(name="bare.convert")  # type: ignore[untyped-decorator]
def convert(source: str, destination: str) -> str:
    convert_file(source, destination)
    return destination
