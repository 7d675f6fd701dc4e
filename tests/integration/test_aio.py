"""asyncio and waiting for many (issue 26): `AsyncVirtualServer`, `wait_all`,
`as_completed`, and every wait of a server on one pub/sub connection.

One Redis (with an append-only file, so a restart keeps the records) and one worker
for the module; connections are counted as Redis lists them (``CLIENT LIST``).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterator

import pytest

from api import VirtualServer, VMTask, VMTaskResult, errors
from api.aio import AsyncVirtualServer, AsyncVMTask
from api.protocol import keys
from workers.devtools.connections import own_connection_list
from workers.devtools.sandbox import RedisServer, WorkerProcess, wait_until

HOST = "aio"


@pytest.fixture(scope="module")
def redis_aio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("aio-redis"), appendonly=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def worker(redis_aio: RedisServer, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[WorkerProcess]:
    base = tmp_path_factory.mktemp("aio-worker")
    process = WorkerProcess(redis_aio.url, HOST, base / "storage", base, concurrency=4).start()
    yield process
    process.stop()


def run(coroutine: object) -> object:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


def test_an_async_task_has_the_members_of_vmtask(redis_aio: RedisServer,
                                                 worker: WorkerProcess) -> None:
    async def scenario() -> None:
        async with AsyncVirtualServer(redis_aio.url, host=HOST) as server:
            assert await server.hosts == [HOST]
            task = await server.ping(duration_ms=50, steps=2)
            assert task.host == HOST and task.description == "Ping: 50 ms in 2 steps"
            assert await task.wait_for_completion(30_000)
            snap = await task.snapshot()
            assert (snap.result, snap.percent_completed, snap.error) == (
                VMTaskResult.Success, 100, 0)
            again = await server.get_task(task.id)
            assert again == task and again.host == HOST
            lines = await task.log()
            long = await server.ping(duration_ms=60_000, steps=600)
            await long.cancel()
            assert await long.wait_for_completion(30_000)
            assert (await long.snapshot()).result is VMTaskResult.Cancelled
            with pytest.raises(errors.TaskNotCancelableError):
                await long.cancel()
            with pytest.raises(errors.TaskNotFoundError):
                await server.get_task("7c0ffee0-0000-4000-8000-000000000000")
            # The record the async server wrote is the sync server's too.
            with VirtualServer(redis_aio.url, host=HOST) as sync:
                assert sync.get_task(task.id).result is VMTaskResult.Success
                assert lines and lines == sync.get_task(task.id).log()
                sync.set_maintenance(HOST, True)
                try:
                    assert (await server.host_status())[HOST]["maintenance"] is True
                finally:
                    sync.set_maintenance(HOST, False)
            assert (await server.host_status())[HOST]["maintenance"] is False

    run(scenario())


def test_bad_input_is_refused_before_anything_is_queued(redis_aio: RedisServer,
                                                        worker: WorkerProcess) -> None:
    async def scenario() -> None:
        async with AsyncVirtualServer(redis_aio.url, host=HOST) as server:
            before = len(await server.tasks(limit=10_000))
            with pytest.raises(errors.InvalidArgumentError):
                await server.ping(duration_ms=-1)
            with pytest.raises(errors.InvalidArgumentError):
                await server.create_fixed_virtual_hard_disk("../escape.vhd", 1)
            with pytest.raises(errors.HostUnavailableError):
                await server.ping(host="nosuchhost")
            task = await server.ping()
            for timeout in (-2, 4_000_001, 1.5, True):
                with pytest.raises(errors.InvalidTimeoutError):
                    await task.wait_for_completion(timeout)  # type: ignore[arg-type]
                with pytest.raises(errors.InvalidTimeoutError):
                    await server.wait_all([task], timeout)  # type: ignore[arg-type]
            for bad in ("abc", [task.id], 3, [task, object()]):
                with pytest.raises(errors.InvalidArgumentError):
                    server.as_completed(bad)  # type: ignore[arg-type]
                with pytest.raises(errors.InvalidArgumentError):
                    await server.wait_all(bad)  # type: ignore[arg-type]
            assert len(await server.tasks(limit=10_000)) == before + 1
            assert await server.wait_all([], 0)

    run(scenario())
    with VirtualServer(redis_aio.url, host=HOST) as sync, pytest.raises(
            errors.InvalidArgumentError):
        sync.wait_all(["not a task"])  # type: ignore[list-item]


def test_timeouts_zero_and_forever(redis_aio: RedisServer, worker: WorkerProcess) -> None:
    async def scenario() -> None:
        async with AsyncVirtualServer(redis_aio.url, host=HOST) as server:
            quick = await server.ping()
            long = await server.ping(duration_ms=60_000, steps=600)
            assert await quick.wait_for_completion(-1)
            started = time.monotonic()
            assert not await long.wait_for_completion(0)
            assert not await server.wait_all([quick, long], 0)
            assert time.monotonic() - started < 1.0
            seen: list[AsyncVMTask] = []
            with pytest.raises(TimeoutError):
                async for task in server.as_completed([long, quick], 300):
                    seen.append(task)
            assert seen == [quick]
            assert not await server.wait_all([quick, long], 200)
            await long.cancel()
            assert await server.wait_all([quick, long], -1)

    run(scenario())
    with VirtualServer(redis_aio.url, host=HOST) as sync:
        long = sync.ping(duration_ms=60_000, steps=600)
        assert not sync.wait_all([long], 0)
        with pytest.raises(TimeoutError):
            list(sync.as_completed([long], 200))
        long.cancel()
        assert sync.wait_all([long], -1)


class DoneOrder:
    """The order in which Redis published the tasks' ``done`` messages: the order in
    which their records became complete (a worker's clock may disagree by a few ms)."""

    def __init__(self, redis_server: RedisServer) -> None:
        self.order: list[str] = []
        self._pubsub = redis_server.client().pubsub()
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


def test_as_completed_yields_in_completion_order(redis_aio: RedisServer,
                                                 worker: WorkerProcess) -> None:
    """Tasks of mixed lengths, four at a time on the worker: as_completed hands them
    out in the order their records became complete (all after its first read)."""
    durations = [random.Random(26).choice((100, 150, 250, 400)) for _ in range(24)]
    published = DoneOrder(redis_aio)

    async def scenario() -> list[str]:
        async with AsyncVirtualServer(redis_aio.url, host=HOST) as server:
            tasks = await asyncio.gather(*(server.ping(duration_ms=ms) for ms in durations))
            order = [task.id async for task in server.as_completed(tasks, 60_000)]
            assert sorted(order) == sorted(t.id for t in tasks)
            return order

    order = run(scenario())
    with VirtualServer(redis_aio.url, host=HOST) as sync:
        tasks = [sync.ping(duration_ms=ms) for ms in durations[:12]]
        sync_order = [task.id for task in sync.as_completed(tasks, 60_000)]
    assert order + sync_order == published.stop()


@pytest.mark.slow
def test_hundreds_of_waits_share_one_connection(redis_aio: RedisServer,
                                                worker: WorkerProcess) -> None:
    """300 concurrent async waits and a sync wait_all of 300: at most 3 producer
    connections each (commands, the one pub/sub, kombu's), counted by Redis."""
    probe = redis_aio.client()
    counts: list[int] = []

    async def scenario() -> None:
        async with AsyncVirtualServer(redis_aio.url, host=HOST) as server:
            tasks = await asyncio.gather(*(server.ping(duration_ms=20) for _ in range(300)))
            waits = asyncio.gather(*(task.wait_for_completion(120_000) for task in tasks))
            while not waits.done():
                entries = own_connection_list(probe)
                counts.append(len(entries))
                assert len(entries) <= 3, [(e["cmd"], e["age"], e["sub"]) for e in entries]
                await asyncio.sleep(0.05)
            assert await waits == [True] * 300
            assert server.waiter.reconnects == 0

    run(scenario())
    assert counts and max(counts) <= 3, counts
    with VirtualServer(redis_aio.url, host=HOST) as sync:
        tasks = [sync.ping(duration_ms=20) for _ in range(300)]
        sync_counts: list[int] = []

        def counted() -> Iterator[object]:
            for task in sync.as_completed(tasks, 120_000):
                entries = own_connection_list(probe)
                sync_counts.append(len(entries))
                assert len(entries) <= 3, [(e["cmd"], e["age"], e["sub"]) for e in entries]
                yield task

        assert len(list(counted())) == 300
        assert max(sync_counts) <= 3, sync_counts


@pytest.mark.slow
def test_a_redis_restart_in_the_middle_of_500_async_waits(redis_aio: RedisServer,
                                                          worker: WorkerProcess) -> None:
    """Every wait returns True exactly once, though Redis went away while the tasks
    ran and completions were published while nobody was subscribed."""
    async def scenario() -> None:
        async with AsyncVirtualServer(redis_aio.url, host=HOST, poll_interval=30) as server:
            tasks = [await server.ping(duration_ms=15) for _ in range(500)]
            returned: list[str] = []

            async def wait(task: AsyncVMTask) -> bool:
                done = await task.wait_for_completion(120_000)
                returned.append(task.id)
                return done

            waits = asyncio.gather(*(wait(task) for task in tasks))
            while len(returned) < 50:
                await asyncio.sleep(0.01)
            assert len(returned) < 450, "too late to restart in the middle"
            redis_aio.stop()
            await asyncio.sleep(0.5)
            redis_aio.start()
            results = await waits
            assert results == [True] * 500
            assert sorted(returned) == sorted(t.id for t in tasks)
            assert server.waiter.reconnects >= 1
            # poll_interval=30: no safety-net poll ran; the resubscription read them.
            snaps = await server.task_snapshots([t.id for t in tasks])
            assert all(s is not None and s.result is VMTaskResult.Success for s in snaps)

    run(scenario())
    with VirtualServer(redis_aio.url) as sync:
        wait_until(lambda: sync.hosts == [HOST], 30, "the worker back after the restart")



@pytest.mark.slow
def test_a_redis_restart_in_the_middle_of_sync_waits_in_threads(
        redis_aio: RedisServer, worker: WorkerProcess) -> None:
    """Forty threads' `wait_for_completion` calls share the server's one waiter; Redis
    restarts while they wait, and each of the 200 returns True exactly once."""
    with VirtualServer(redis_aio.url, host=HOST, poll_interval=30) as server:
        wait_until(lambda: server.hosts == [HOST], 30, "the worker")
        tasks = [server.ping(duration_ms=15) for _ in range(200)]
        returned: list[tuple[str, bool]] = []
        lock = threading.Lock()

        def wait(mine: list[VMTask]) -> None:
            for task in mine:
                done = task.wait_for_completion(120_000)
                with lock:
                    returned.append((task.id, done))

        threads = [threading.Thread(target=wait, args=(tasks[i::40],)) for i in range(40)]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(returned) >= 30, 60, "some waits to return", interval=0.01)
        assert len(returned) < 170, "too late to restart in the middle"
        redis_aio.stop()
        time.sleep(0.5)
        redis_aio.start()
        for thread in threads:
            thread.join(120)
        assert sorted(returned) == sorted((t.id, True) for t in tasks)
        assert server.store.waiter.reconnects >= 1
        wait_until(lambda: server.hosts == [HOST], 30, "the worker back after the restart")
