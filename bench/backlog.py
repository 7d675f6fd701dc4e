"""A queued backlog at scale: BENCH_BACKLOG_TASKS (default 100,000) ``ping()`` tasks
queued while no worker consumes.

Reports Redis memory per queued task (``INFO memory`` used_memory after minus before,
divided by N; target <= 1.6 KB) and, with that backlog in place, the latency of
``server.tasks()`` (the default listing, as ``vmtask task list`` calls it; target
< 100 ms, median of BENCH_ROUNDS calls) and of a filtered listing.  The baseline is
the same memory figure for bare Celery messages (BENCH_BACKLOG_BARE_TASKS, default
10,000, queued by ``send_task`` to the bare worker with its consumer cancelled).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from bench.common import ROUNDS, record_row, stack, verdict
from bench.enqueue import stop_consuming

N = int(os.environ.get("BENCH_BACKLOG_TASKS", "100000"))
N_BARE = int(os.environ.get("BENCH_BACKLOG_BARE_TASKS", "10000"))
TARGET_BYTES = 1.6 * 1024
TARGET_MS = 100.0


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def bytes_per_task(client: redis.Redis, n: int, enqueue: Callable[[], object]) -> float:
    before = used_memory(client)
    started = time.perf_counter()
    for i in range(n):
        enqueue()
        if i and i % 20_000 == 0:
            print(f"    {i:,} queued, {i / (time.perf_counter() - started):.0f}/s", flush=True)
    return (used_memory(client) - before) / n


def latency_ms(call: Callable[[], object], rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def main() -> None:
    with stack() as s:
        server, client = s.server, s.client()
        stop_consuming(s)
        server.ping()  # warm-up: connections and scripts
        s.bare_client.send_task("bare.noop")
        print(f"  queueing {N:,} vmtask pings...", flush=True)
        ours = bytes_per_task(client, N, server.ping)
        listing = latency_ms(lambda: server.tasks(), max(ROUNDS, 10))
        filtered = latency_ms(lambda: server.tasks(state="STARTED"), 3)
        print(f"  queueing {N_BARE:,} bare Celery messages...", flush=True)
        bare = bytes_per_task(client, N_BARE, lambda: s.bare_client.send_task("bare.noop"))
    lat = statistics.median(listing)
    mem_met = ours <= TARGET_BYTES
    lat_met = lat < TARGET_MS
    print(f"Backlog of {N:,} queued tasks, no consumer:")
    print(f"  Redis memory per queued task: vmtask {ours:7.0f} B, bare Celery message "
          f"{bare:7.0f} B  ({ours / bare:.2f}x); target <= {TARGET_BYTES:.0f} B: "
          f"{verdict(mem_met)}")
    print(f"  server.tasks() with the backlog: median {lat:.1f} ms over {len(listing)} calls "
          f"({min(listing):.1f}-{max(listing):.1f}); target < {TARGET_MS:g} ms: "
          f"{verdict(lat_met)}")
    print(f"  server.tasks(state='STARTED') (matches none, scans back): median "
          f"{statistics.median(filtered):.0f} ms over {len(filtered)} calls")
    record_row(f"Redis memory per queued task ({N:,} queued)", f"{ours / 1024:.2f} KB",
               f"bare message {bare / 1024:.2f} KB", f"{ours / bare:.2f}x",
               f"<= {TARGET_BYTES / 1024:.1f} KB", mem_met)
    record_row(f"server.tasks() with {N:,} queued", f"{lat:.1f} ms", "-", "-",
               f"< {TARGET_MS:g} ms", lat_met)
    scan = statistics.median(filtered)
    record_row(f"server.tasks(state=...) matching none of {N:,} queued (looks 20,000 back)",
               f"{scan:.0f} ms", "-", "-", f"< {TARGET_MS:g} ms", scan < TARGET_MS)


if __name__ == "__main__":
    main()
