"""What the benchmarks share: the processes, the rounds, the CPU meters, the report.

Every benchmark runs one private redis-server (AOF on, as deployed), vmtask's worker
(``celery -A workers worker``, prefork ``-c 4``, ``--loglevel INFO``) and, as the
baseline, bare Celery on its own worker (`BareWorker`, bench/bare_app.py) with the
same pool, concurrency, prefetch, log level and task events.  Rounds alternate which
side goes first; a comparison is the median of the per-round ratios.  Beside wall
time, each side reports CPU per task: the producer (this process), the worker (its
whole process group) and redis-server.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
import redis.connection
from celery import Celery
from redis import Redis

from api import VirtualServer
from bench import bare_app
from workers.devtools.sandbox import REPO_ROOT, RedisServer, WorkerProcess, stop_process_group
from workers.devtools.sandbox import wait_until as wait_until

ROUNDS = max(1, int(os.environ.get("BENCH_ROUNDS", "10")))
CONCURRENCY = 4
HOST = "bench"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- processes ---------------------------------------------------------------------


class BareWorker:
    """``celery -A bench.bare_app worker`` on its own, configured like vmtask's worker."""

    def __init__(self, redis_url: str, log_dir: Path, concurrency: int = CONCURRENCY) -> None:
        self.redis_url = redis_url
        self.concurrency = concurrency
        self.node = f"bare-{uuid.uuid4().hex[:6]}@bench"
        self.log_path = log_dir / f"{self.node.split('@')[0]}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "celery", "-A", "bench.bare_app", "worker", "-E",
            "-P", "prefork", "-c", str(self.concurrency), "--prefetch-multiplier", "1",
            "--loglevel", "INFO", "-n", self.node,
            # As workers.devtools.sandbox.WorkerProcess starts vmtask's worker.
            "--without-gossip", "--without-mingle",
        ]

    def start(self, client: Celery) -> BareWorker:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv(), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "BENCH_REDIS_URL": self.redis_url,
                     "PYTHONPATH": str(REPO_ROOT)},
                start_new_session=True,
            )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"bare worker exited:\n{self.log_path.read_text()}")
            replies = client.control.ping(destination=[self.node], timeout=0.5)
            return any(self.node in reply for reply in replies)

        wait_until(ready, 60, "the bare Celery worker", interval=0.2)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)
            self.proc = None


@dataclass
class Stack:
    """One Redis, vmtask's worker for host ``bench`` and/or the bare worker."""

    tmp: Path
    storage: Path
    redis: RedisServer
    vmtask: WorkerProcess | None = None
    bare: BareWorker | None = None
    _server: VirtualServer | None = None
    _bare_client: Celery | None = None

    @property
    def url(self) -> str:
        return self.redis.url

    @property
    def server(self) -> VirtualServer:
        if self._server is None:
            self._server = VirtualServer(self.url, host=HOST, poll_interval=0.5)
        return self._server

    @property
    def bare_client(self) -> Celery:
        if self._bare_client is None:
            self._bare_client = bare_app.make_app(self.url)
        return self._bare_client

    def client(self) -> Redis:
        return self.redis.client()


@contextmanager
def stack(*, vmtask: bool = True, bare: bool = True, directory: str | None = None,
          appendonly: bool = True) -> Iterator[Stack]:
    with tempfile.TemporaryDirectory(prefix="vmtask-bench-", dir=directory) as t:
        tmp = Path(t)
        storage = tmp / "storage"
        storage.mkdir()
        s = Stack(tmp, storage, RedisServer(tmp / "redis", appendonly=appendonly).start())
        try:
            if vmtask:
                s.vmtask = WorkerProcess(s.url, HOST, storage, tmp, concurrency=CONCURRENCY,
                                         include=())
                s.vmtask.start()
            if bare:
                s.bare = BareWorker(s.url, tmp).start(s.bare_client)
            yield s
        finally:
            if s._server is not None:
                s._server.close()
            if s._bare_client is not None:
                s._bare_client.close()
            for worker in (s.bare, s.vmtask):
                if worker is not None:
                    worker.stop()
            s.redis.stop()


# -- CPU and wall time -------------------------------------------------------------


def _stat_fields(pid: int | str) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may hold spaces; everything after its ')' is space-separated,
    # starting at field 3 (state).
    return raw[raw.rindex(")") + 2:].split()


def _cpu_of(fields: list[str]) -> float:
    # utime, stime, cutime, cstime (fields 14-17): cutime/cstime carry children that
    # were reaped, e.g. qemu-img, which runs in a session of its own.
    return sum(int(v) for v in fields[11:15]) / _CLK_TCK


def group_cpu(pgid: int) -> float:
    """CPU seconds of every process in process group ``pgid`` (a worker and its pool)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(entry)) and int(fields[2]) == pgid:
            total += _cpu_of(fields)
    return total


def process_cpu(pid: int) -> float:
    fields = _stat_fields(pid)
    return _cpu_of(fields) if fields else 0.0


@dataclass
class Cost:
    """One side of one round: ``n`` tasks, wall seconds and CPU seconds."""

    n: int
    wall: float
    producer_cpu: float
    worker_cpu: float
    redis_cpu: float

    @property
    def per_task(self) -> float:
        return self.wall / self.n

    @property
    def rate(self) -> float:
        return self.n / self.wall


class Meter:
    """Measures an action's wall time and the CPU it cost each process."""

    def __init__(self, redis_server: RedisServer, worker_pgid: int | None) -> None:
        assert redis_server.proc is not None
        self.redis_pid = redis_server.proc.pid
        self.worker_pgid = worker_pgid

    def _cpu(self) -> tuple[float, float, float]:
        worker = group_cpu(self.worker_pgid) if self.worker_pgid is not None else 0.0
        # The producer's reaped children count too: a direct qemu-img runs as one.
        times = os.times()
        producer = time.process_time() + times.children_user + times.children_system
        return producer, worker, process_cpu(self.redis_pid)

    def run(self, n: int, action: Callable[[], object]) -> Cost:
        before = self._cpu()
        started = time.perf_counter()
        action()
        wall = time.perf_counter() - started
        after = self._cpu()
        return Cost(n, wall, *(b - a for a, b in zip(before, after, strict=True)))


def meter_for(s: Stack, side: str) -> Meter:
    worker = s.vmtask if side == "vmtask" else s.bare
    pgid = worker.proc.pid if worker is not None and worker.proc is not None else None
    return Meter(s.redis, pgid)


def alternate(rounds: int, sides: dict[str, Callable[[], Cost]]) -> dict[str, list[Cost]]:
    """Each side once per round; the side that goes first rotates every round."""
    names = list(sides)
    results: dict[str, list[Cost]] = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            results[name].append(sides[name]())
    return results


# -- reporting ---------------------------------------------------------------------


@dataclass
class Ratio:
    per_round: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.per_round)

    def __str__(self) -> str:
        return (f"{self.median:.2f}x (rounds {min(self.per_round):.2f}-"
                f"{max(self.per_round):.2f})")


def ratio(ours: list[Cost], base: list[Cost], metric: Callable[[Cost], float]) -> Ratio:
    return Ratio([metric(o) / metric(b) for o, b in zip(ours, base, strict=True)])


def cpu_line(costs: list[Cost]) -> str:
    # Totals over all rounds: /proc counts CPU in clock ticks (10 ms), too coarse
    # for one round's share of a task.
    tasks = sum(c.n for c in costs)

    def per_task_ms(get: Callable[[Cost], float]) -> float:
        return sum(get(c) for c in costs) / tasks * 1000

    return (f"CPU/task: producer {per_task_ms(lambda c: c.producer_cpu):.2f} ms, "
            f"worker {per_task_ms(lambda c: c.worker_cpu):.2f} ms, "
            f"redis {per_task_ms(lambda c: c.redis_cpu):.2f} ms")


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def record_row(row: str, vmtask: str, baseline: str, ratio_text: str, target: str,
               met: bool | None) -> None:
    """One line of the benchmarks table (docs/benchmarks.md); `bench.__main__` collects them."""
    path = os.environ.get("BENCH_ROWS_FILE")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"row": row, "vmtask": vmtask, "baseline": baseline,
                                  "ratio": ratio_text, "target": target, "met": met}) + "\n")


# -- counting the producer's Redis commands ---------------------------------------

# redis-py sends these on a pub/sub connection without reading a reply: the reply
# arrives later among the messages, so they cost no blocking round trip.
PUBSUB_COMMANDS = frozenset({"SUBSCRIBE", "UNSUBSCRIBE", "PSUBSCRIBE", "PUNSUBSCRIBE",
                             "SSUBSCRIBE", "SUNSUBSCRIBE"})


@dataclass
class CommandCounter:
    """Every Redis command this process packs and every packet it sends, by redis-py
    (vmtask's store and kombu's transport and Celery's result backend all use it).

    A *send* is one write of one or more packed commands (a pipeline or a MULTI is
    one); a *round trip* is a send whose reply the caller then waits for, that is,
    every send but a pub/sub (un)subscribe.  Patching the packers rather than
    ``Connection.pack_command`` catches ``send_command``, which packs on its own.
    """

    commands: Counter[str] = field(default_factory=Counter)
    sends: int = 0
    round_trips: int = 0
    ports: set[int] = field(default_factory=set)
    active: bool = False
    _pending: threading.local = field(default_factory=threading.local)

    def reset(self) -> None:
        self.commands.clear()
        self.sends = 0
        self.round_trips = 0

    def packed(self, args: tuple[Any, ...]) -> None:
        if not self.active or not args:
            return
        head = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
        name = head.split()[0].upper()
        self.commands[name] += 1
        pending: list[str] = getattr(self._pending, "names", None) or []
        pending.append(name)
        self._pending.names = pending

    def sent(self, connection: Any) -> None:
        names: list[str] = getattr(self._pending, "names", None) or []
        self._pending.names = []
        if not self.active:
            return
        self.sends += 1
        if not names or not all(n in PUBSUB_COMMANDS for n in names):
            self.round_trips += 1
        sock = getattr(connection, "_sock", None)
        if sock is not None:
            self.ports.add(int(sock.getsockname()[1]))

    @property
    def total(self) -> int:
        return sum(self.commands.values())


COUNTER = CommandCounter()
_installed = False


def install_counter() -> CommandCounter:
    """Patch redis-py once in this process; `COUNTER.active` turns counting on."""
    global _installed
    if _installed:
        return COUNTER
    _installed = True
    for cls in (redis.connection.PythonRespSerializer, redis.connection.HiredisRespSerializer):
        original_pack = cls.pack

        def pack(self: Any, *args: Any, _original: Any = original_pack) -> Any:
            COUNTER.packed(args)
            return _original(self, *args)

        cls.pack = pack
    original_send = redis.connection.AbstractConnection.send_packed_command

    def send_packed_command(self: Any, command: Any, check_health: bool = True) -> None:
        # Take the pending names before sending: a connect or health check inside the
        # send packs and sends commands of its own.
        names: list[str] = getattr(COUNTER._pending, "names", None) or []
        COUNTER._pending.names = []
        original_send(self, command, check_health)
        COUNTER._pending.names = names
        COUNTER.sent(self)

    redis.connection.AbstractConnection.send_packed_command = (
        send_packed_command)
    return COUNTER


@contextmanager
def counting() -> Iterator[CommandCounter]:
    counter = install_counter()
    counter.reset()
    counter.active = True
    try:
        yield counter
    finally:
        counter.active = False
