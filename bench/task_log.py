"""What the task log adds to every task: Redis time of the start and finish scripts.

The start and end lines are written inside the scripts that start and finish a
task (`api/protocol/lua/task_log.lua`), so the log adds no round trip; what it adds
is Redis time in those scripts.  Measured on a private redis-server as Redis counts
it (INFO commandstats, microseconds per EVALSHA), for BENCH_LOG_TASKS tasks
(default 5000) started and finished, against the same scripts with their
``task_log(...)`` calls taken out, in the same run: BENCH_ROUNDS alternating rounds.
The ping round trip and throughput (round_trip.py, throughput.py) are where this
must not show; this says how much there is to show.
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.protocol import keys, scripts
from bench.common import ROUNDS, record_row
from workers.devtools.sandbox import RedisServer

N = int(os.environ.get("BENCH_LOG_TASKS", "5000"))
# A `task_log(...)` statement: from its name to the closing brace of its entry and
# the optional TTL argument.
_LOG_CALL = re.compile(r"^\s*task_log\(KEYS\[1\], \{.*?\}(?:, ARGV\[\d+\])?\)\s*$",
                       re.MULTILINE | re.DOTALL)


def without_log(script: str) -> str:
    stripped, count = _LOG_CALL.subn("", script)
    assert count >= 1, "no task_log call found: the pattern is out of date"
    return stripped


def run_round(client: redis.Redis, start: str, finish: str, label: str) -> float:
    """Microseconds of Redis per task for its start and finish scripts."""
    client.flushall()
    pipe = client.pipeline(transaction=False)
    for i in range(N):
        record = keys.task_record(f"{label}-{i}")
        pipe.hset(record, mapping={"name": "vm.ping", "host": "bench", "state": "PENDING",
                                   "created": repr(time.time())})
        pipe.expire(record, 30 * 86400)
    pipe.execute()
    start_sha, finish_sha = client.script_load(start), client.script_load(finish)
    client.config_resetstat()
    for i in range(N):
        task_id = f"{label}-{i}"
        record, lease = keys.task_record(task_id), keys.task_lease(task_id)
        client.evalsha(start_sha, 3, record, lease, keys.RUNNING_TASKS,
                       repr(time.time()), "bench:machine:1", 15000, task_id, "celery@bench")
        client.evalsha(finish_sha, 4, record, lease, keys.RUNNING_TASKS,
                       keys.task_channel(task_id), "SUCCESS", 0, 0, "", repr(time.time()), 100,
                       86400, task_id, "0", '{"steps": 0}')
    stats = client.info("commandstats")["cmdstat_evalsha"]
    return float(stats["usec"]) / N


def main() -> None:
    start, finish = scripts.load("task_start"), scripts.load("task_finish")
    sides = {"with log": (start, finish), "without": (without_log(start), without_log(finish))}
    results: dict[str, list[float]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory(prefix="vmtask-bench-log-") as directory:
        server = RedisServer(Path(directory)).start()
        try:
            client = server.client()
            for round_number in range(ROUNDS):
                order = list(sides) if round_number % 2 == 0 else list(reversed(sides))
                for name in order:
                    results[name].append(run_round(client, *sides[name], f"r{round_number}"))
        finally:
            server.stop()
    ours = statistics.median(results["with log"])
    base = statistics.median(results["without"])
    print(f"Start + finish scripts, {N} tasks x {ROUNDS} alternating rounds (Redis time):")
    print(f"  with the task log     {ours:6.1f} us/task")
    print(f"  without (same run)    {base:6.1f} us/task")
    print(f"added by the log: {ours - base:+.1f} us of Redis per task ({ours / base:.2f}x)")
    record_row("task log: Redis time of start+finish", f"{ours:.1f} us", f"{base:.1f} us",
               f"{ours / base:.2f}x", "no round trip added", None)


if __name__ == "__main__":
    main()
