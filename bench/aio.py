"""asyncio and waiting for many (issue 26), against bare Celery in the same run.

1. 2,000 ``ping(0)`` submitted and awaited concurrently from one process
   (`api.aio.AsyncVirtualServer`) against 2,000 bare Celery ``noop`` tasks joined
   with ``ResultSet.join_native()`` on Celery's Redis backend.  Target: total time
   <= 1.0x.  The producer's Redis connections are counted meanwhile through
   ``CLIENT LIST``; target: at most 3.
2. Completion noticed after the task's final write (the record's ``finished``
   time), p99, with 2,000 waits open against one wait open.  Target: <= 2x.
3. ``as_completed`` over 500 tasks of mixed lengths: each yielded how long after
   its final write (p99; target <= 5 ms), and whether the order is that in which
   Redis published their completions.

BENCH_AIO_TASKS (default 2000), BENCH_AIO_ROUNDS (default 3) rounds of part 1,
alternating which side goes first.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from celery.result import ResultSet

from api.aio import AsyncVirtualServer, AsyncVMTask
from api.protocol import keys
from bench.common import CONCURRENCY, HOST, record_row, stack, verdict, wait_until
from workers.devtools.connections import own_connections

N = int(os.environ.get("BENCH_AIO_TASKS", "2000"))
ROUNDS = max(1, int(os.environ.get("BENCH_AIO_ROUNDS", "3")))
MIXED = 500
SINGLE = 200  # one-wait-open samples
TOTAL_TARGET, CONNECTIONS_TARGET, NOTICE_TARGET, LATE_TARGET_MS = 1.0, 3, 2.0, 5.0


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


class Published:
    """The order in which Redis published ``done`` on the tasks' channels."""

    def __init__(self, client: object) -> None:
        self.order: list[str] = []
        self._pubsub = client.pubsub()  # type: ignore[attr-defined]
        self._pubsub.psubscribe(keys.task_channel("*"))
        wait_until(lambda: (self._pubsub.get_message(timeout=0.1) or {}).get("type")
                   == "psubscribe", 10, "the psubscribe")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.1)
            if message and message["data"] == "done":
                self.order.append(message["channel"].removeprefix(keys.task_channel("")))

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(5)
        self._pubsub.close()
        return self.order


async def many(server: AsyncVirtualServer, probe: object, n: int,
               connections: list[int]) -> float:
    """n ping(0) submitted and awaited at once: the wall time.  ``connections``
    gets the producer's connection count every 0.1 s (beyond those held before)."""
    before = own_connections(probe)  # type: ignore[arg-type]

    async def one() -> None:
        task = await server.ping()
        assert await task.wait_for_completion(-1)

    async def count() -> None:
        while True:
            connections.append(own_connections(probe) - before)  # type: ignore[arg-type]
            await asyncio.sleep(0.1)

    counter = asyncio.ensure_future(count())
    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    wall = time.perf_counter() - started
    counter.cancel()
    return wall


async def held(server: AsyncVirtualServer) -> list[AsyncVMTask]:
    """Every slot of the worker busy until `release`: what is submitted next queues,
    so its waits are all open before any of it completes."""
    return list(await asyncio.gather(*(server.ping(duration_ms=600_000)
                                       for _ in range(CONCURRENCY))))


async def release(server: AsyncVirtualServer, blockers: list[AsyncVMTask],
                  watches: int) -> None:
    """Once ``watches`` waits have subscribed and read their records, free the slots."""
    def armed() -> int:
        return sum(1 for w in server.waiter._book.watches() if w.armed)

    while armed() < watches:
        await asyncio.sleep(0.01)
    await asyncio.sleep(1.0)  # their first reads
    for blocker in blockers:
        await blocker.cancel()


async def open_waits(server: AsyncVirtualServer, n: int) -> list[float]:
    """n ping(0) queued behind busy slots, n waits open: each notice latency (s
    after the record's final write)."""
    blockers = await held(server)
    tasks = await asyncio.gather(*(server.ping() for _ in range(n)))
    noticed: dict[str, float] = {}

    async def wait(task: AsyncVMTask) -> None:
        assert await task.wait_for_completion(-1)
        noticed[task.id] = time.time()

    await asyncio.gather(release(server, blockers, n), *(wait(task) for task in tasks))
    assert await server.wait_all(blockers, 60_000)
    snaps = await server.task_snapshots([t.id for t in tasks])
    return [noticed[s.id] - (s.finished or 0.0) for s in snaps if s is not None]


async def single(server: AsyncVirtualServer, n: int) -> list[float]:
    """One wait open at a time (on a 20 ms ping, so it is open before the end)."""
    latency = []
    for _ in range(n):
        task = await server.ping(duration_ms=20)
        assert await task.wait_for_completion(-1)
        at = time.time()
        latency.append(at - ((await task.snapshot()).finished or 0.0))
    return latency


async def mixed(server: AsyncVirtualServer, n: int) -> tuple[list[str], list[float]]:
    """n tasks of mixed lengths queued behind busy slots, through as_completed."""
    blockers = await held(server)
    durations = [(0, 5, 20, 50)[i % 4] for i in range(n)]
    tasks = await asyncio.gather(*(server.ping(duration_ms=ms) for ms in durations))
    order: list[str] = []
    yielded: dict[str, float] = {}
    releasing = asyncio.ensure_future(release(server, blockers, 1))
    async for task in server.as_completed(tasks, 300_000):
        yielded[task.id] = time.time()
        order.append(task.id)
    await releasing
    assert await server.wait_all(blockers, 60_000)
    snaps = await server.task_snapshots(order)
    return order, [yielded[s.id] - (s.finished or 0.0) for s in snaps if s is not None]


def main() -> None:
    with stack() as s:
        probe = s.client()
        bare = s.bare_client

        def bare_side() -> float:
            started = time.perf_counter()
            results = ResultSet([bare.send_task("bare.noop") for _ in range(N)])
            results.join_native(timeout=600)
            wall = time.perf_counter() - started
            results.forget()
            return wall

        async def ours(connections: list[int]) -> float:
            async with AsyncVirtualServer(s.url, host=HOST) as server:
                return await many(server, probe, N, connections)

        bare_side()  # warm: connections, the worker's pool
        asyncio.run(ours([]))
        ours_walls: list[float] = []
        bare_walls: list[float] = []
        connections: list[int] = []
        for index in range(ROUNDS):
            order = ("ours", "bare") if index % 2 == 0 else ("bare", "ours")
            for side in order:
                if side == "bare":
                    bare_walls.append(bare_side())
                else:
                    ours_walls.append(asyncio.run(ours(connections)))

        async def latencies() -> tuple[list[float], list[float]]:
            async with AsyncVirtualServer(s.url, host=HOST) as server:
                return await open_waits(server, N), await single(server, SINGLE)

        many_latency, one_latency = asyncio.run(latencies())
        published = Published(probe)

        async def completed() -> tuple[list[str], list[float]]:
            async with AsyncVirtualServer(s.url, host=HOST) as server:
                return await mixed(server, MIXED)

        mixed_order, lateness = asyncio.run(completed())
        publish_order = [i for i in published.stop() if i in set(mixed_order)]

    ratios = [o / b for o, b in zip(ours_walls, bare_walls, strict=True)]
    total = statistics.median(ratios)
    most = max(connections)
    many_p99, one_p99 = p99(many_latency) * 1000, p99(one_latency) * 1000
    notice = many_p99 / one_p99
    late_p99 = p99(lateness) * 1000
    in_order = mixed_order == publish_order
    print(f"{N} ping(0) awaited at once (asyncio) vs {N} bare noop + join_native, "
          f"{ROUNDS} rounds:")
    print(f"  vmtask {statistics.median(ours_walls):.2f} s, bare "
          f"{statistics.median(bare_walls):.2f} s; ratio median {total:.2f}x "
          f"(rounds {', '.join(f'{r:.2f}' for r in ratios)}), target <= {TOTAL_TARGET}x: "
          f"{verdict(total <= TOTAL_TARGET)}")
    print(f"  producer connections (CLIENT LIST): at most {most}, target <= "
          f"{CONNECTIONS_TARGET}: {verdict(most <= CONNECTIONS_TARGET)}")
    print(f"completion noticed, p99: {many_p99:.2f} ms with {N} waits open, "
          f"{one_p99:.2f} ms with one; ratio {notice:.2f}x, target <= {NOTICE_TARGET}x: "
          f"{verdict(notice <= NOTICE_TARGET)}")
    print(f"as_completed over {MIXED} mixed tasks: lateness p99 {late_p99:.2f} ms "
          f"(median {statistics.median(lateness) * 1000:.2f} ms), target <= "
          f"{LATE_TARGET_MS} ms: {verdict(late_p99 <= LATE_TARGET_MS)}; in Redis's "
          f"completion order: {in_order}")
    record_row(f"{N} ping(0) awaited at once (asyncio) vs bare noop + join_native",
               f"{statistics.median(ours_walls):.2f} s",
               f"{statistics.median(bare_walls):.2f} s", f"{total:.2f}x",
               f"<= {TOTAL_TARGET}x", total <= TOTAL_TARGET)
    record_row(f"producer connections, {N} async waits", str(most), "-", "-",
               f"<= {CONNECTIONS_TARGET}", most <= CONNECTIONS_TARGET)
    record_row(f"completion noticed p99, {N} waits open vs 1", f"{many_p99:.2f} ms",
               f"{one_p99:.2f} ms", f"{notice:.2f}x", f"<= {NOTICE_TARGET}x",
               notice <= NOTICE_TARGET)
    record_row(f"as_completed over {MIXED} mixed tasks, lateness p99", f"{late_p99:.2f} ms",
               "-", "-", f"<= {LATE_TARGET_MS} ms, in order",
               late_p99 <= LATE_TARGET_MS and in_order)


if __name__ == "__main__":
    main()
