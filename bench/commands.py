"""Redis commands and blocking round trips the producer pays per task, exactly.

vmtask: ``server.ping()`` + ``wait_for_completion(-1)``; bare Celery:
``send_task("bare.noop")`` + ``.get()`` on its own worker; then the same with a task
that takes 50 ms (``ping(50)``, ``bare.stamp(0.05)``), so that every wait finds it
still running.  Counted in this process
by patching redis-py (`bench.common.CommandCounter`), after a warm-up, over N tasks
each; prints the per-command breakdown per task.  Target: <= 8 producer commands for
any submit-and-wait.

``--monitor`` also records the same run with ``redis-cli MONITOR`` and compares
what Redis saw from this process's connections with what the counter counted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Stack, counting, install_counter, record_row, stack, verdict, wait_until

N = int(os.environ.get("BENCH_COMMAND_TASKS", "50"))
TARGET = 8


def vmtask_one(s: Stack, duration_ms: int) -> Callable[[], None]:
    def run() -> None:
        assert s.server.ping(duration_ms).wait_for_completion(-1)
    return run


def bare_one(s: Stack, duration_ms: int) -> Callable[[], None]:
    def run() -> None:
        if duration_ms:
            s.bare_client.send_task("bare.stamp", args=[duration_ms / 1000]).get(timeout=30)
        else:
            s.bare_client.send_task("bare.noop").get(timeout=30)
    return run


class Monitor:
    """``redis-cli MONITOR`` into a file, bracketed by marker commands so the whole
    window has been written before it is read."""

    def __init__(self, s: Stack) -> None:
        self.s = s
        self.path = s.tmp / f"monitor-{uuid.uuid4().hex[:6]}.log"
        self.marker = uuid.uuid4().hex
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Monitor:
        with self.path.open("wb") as out:
            self.proc = subprocess.Popen(
                ["redis-cli", "-p", str(self.s.redis.port), "monitor"], stdout=out)
        # Not through the counted client: its own connection must not be counted.
        wait_until(lambda: self._seen(f"start-{self.marker}"), 10, "MONITOR to start",
                   interval=0.05)
        return self

    def _seen(self, marker: str) -> bool:
        subprocess.run(["redis-cli", "-p", str(self.s.redis.port), "echo", marker],
                       check=True, capture_output=True)
        return marker in self.path.read_text(errors="replace")

    def __exit__(self, *exc: object) -> None:
        wait_until(lambda: self._seen(f"end-{self.marker}"), 10, "MONITOR to catch up",
                   interval=0.05)
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()

    def commands_from(self, ports: set[int]) -> Counter[str]:
        seen: Counter[str] = Counter()
        for line in self.path.read_text(errors="replace").splitlines():
            # 1712345678.123456 [0 127.0.0.1:51234] "LPUSH" "key" ...
            try:
                client = line.split("[", 1)[1].split("]", 1)[0]
                port = int(client.rsplit(":", 1)[1])
            except (IndexError, ValueError):
                continue  # a script's own calls show as [0 lua]
            if port in ports:
                seen[line.split("] ", 1)[1].split('"')[1].upper()] += 1
        return seen


# commands by name, round trips, sends, and how many tasks cost how many commands
Counted = tuple[Counter[str], int, int, Counter[int]]


def count(s: Stack, one: Callable[[], None], monitor: bool) -> Counted:
    for _ in range(10):
        one()  # warm-up: connections, scripts loaded, queues declared
    counter = install_counter()
    per_task: Counter[int] = Counter()

    def tasks() -> None:
        for _ in range(N):
            before = counter.total
            one()
            per_task[counter.total - before] += 1

    with counting():
        if monitor:
            with Monitor(s) as mon:
                tasks()
            seen = mon.commands_from(counter.ports)
            print(f"  MONITOR saw {sum(seen.values())} commands from this process's "
                  f"connections; the counter counted {counter.total}:")
            for name in sorted(set(seen) | set(counter.commands)):
                flag = "" if seen[name] == counter.commands[name] else "   <-- differs"
                print(f"    {name:12} MONITOR {seen[name]:5}  counter "
                      f"{counter.commands[name]:5}{flag}")
        else:
            tasks()
        return Counter(counter.commands), counter.round_trips, counter.sends, per_task


def show(label: str, commands: Counter[str], round_trips: int, sends: int,
         per_task: Counter[int]) -> float:
    total = sum(commands.values())
    breakdown = ", ".join(f"{name} {n / N:g}" for name, n in commands.most_common())
    spread = ", ".join(f"{k} x{v}" for k, v in sorted(per_task.items()))
    print(f"  {label:12} {total / N:5.2f} commands/task ({spread}), {round_trips / N:5.2f} "
          f"blocking round trips/task ({sends / N:g} sends)")
    print(f"  {'':12} {breakdown}")
    return total / N


# A no-op races the producer's first read, so its count varies with the machine's
# load; a task that is still running when the wait starts takes the waiting path
# every time.
SCENARIOS = {"no-op": 0, "a 50 ms task (the wait finds it running)": 50}


def main() -> None:
    monitor = "--monitor" in sys.argv[1:]
    install_counter()
    counts: dict[str, tuple[Counted, Counted]] = {}
    with stack() as s:
        for label, duration_ms in SCENARIOS.items():
            counts[label] = (count(s, vmtask_one(s, duration_ms), monitor),
                             count(s, bare_one(s, duration_ms), monitor))
    worst = 0
    for label, (ours, bare) in counts.items():
        print(f"Producer Redis traffic per submit + wait, {label}, over {N} tasks:")
        per_task = show("vmtask", *ours)
        bare_per_task = show("bare Celery", *bare)
        worst = max(worst, *ours[3])
        record_row(f"producer Redis commands per submit + wait, {label}", f"{per_task:g}",
                   f"{bare_per_task:g}", f"{per_task / bare_per_task:.2f}x", f"<= {TARGET}",
                   max(ours[3]) <= TARGET)
        record_row(f"producer blocking round trips per submit + wait, {label}",
                   f"{ours[1] / N:g}", f"{bare[1] / N:g}", f"{ours[1] / bare[1]:.2f}x", "",
                   None)
    print(f"most producer commands for one vmtask submit + wait: {worst}; target <= {TARGET}: "
          f"{verdict(worst <= TARGET)}")

if __name__ == "__main__":
    main()
