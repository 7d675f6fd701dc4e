"""What the benchmarks share: one private Redis and one worker, started and stopped."""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from workers.devtools.sandbox import RedisServer, WorkerProcess


@contextmanager
def redis_and_worker(host: str = "bench", concurrency: int = 2) -> Iterator[tuple[str, str]]:
    with tempfile.TemporaryDirectory(prefix="vmtask-bench-") as tmp:
        root = Path(tmp)
        redis = RedisServer(root / "redis").start()
        worker = WorkerProcess(redis.url, host, root / "storage", root, concurrency=concurrency)
        try:
            worker.start()
            yield redis.url, host
        finally:
            worker.stop()
            redis.stop()


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000
