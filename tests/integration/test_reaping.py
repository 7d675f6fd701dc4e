"""Orphans are judged without any host scanning the fleet (issue 27).

A host dies for good with a task running.  Its task still ends ThreadCrashError
within the lease (plus a beat of a live host's reaper), judged by the live hosts,
while a simulated fleet's running tasks with live leases are never read by anyone:
the live hosts read only the due end of the lease deadlines.  Seen through MONITOR,
every command Redis ran (scripts' inner calls included).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from api import VirtualServer, VMTaskResult
from api.protocol import keys, records
from workers.devtools.sandbox import RedisServer, wait_until

pytestmark = pytest.mark.slow

LEASE, HEARTBEAT = 3.0, 3.0
FAST = {"VMTASK_HEARTBEAT_SECONDS": str(HEARTBEAT), "VMTASK_LEASE_SECONDS": str(LEASE)}
FLEET_TASKS = 200


def simulate_fleet(redis: RedisServer) -> list[str]:
    """Running tasks of a host that is not ours, with live leases: as the start script
    writes them (record, lease, running sets, deadline)."""
    client = redis.client()
    now_ms = int(time.time() * 1000)
    ids = [f"fleet-{i:04d}" for i in range(FLEET_TASKS)]
    pipe = client.pipeline(transaction=False)
    pipe.set(keys.host_heartbeat("elsewhere"), json.dumps({"host": "elsewhere"}), px=600_000)
    pipe.sadd(keys.KNOWN_HOSTS, "elsewhere")
    for task_id in ids:
        pipe.hset(keys.task_record(task_id), mapping={
            "name": "vmtask.ping", "host": "elsewhere", "state": records.STARTED,
            "worker": "elsewhere:m:1", "created": repr(time.time()), "percent": "0"})
        pipe.set(keys.task_lease(task_id), "elsewhere:m:1", px=600_000)
        pipe.sadd(keys.RUNNING_TASKS, task_id)
        pipe.sadd(keys.host_running("elsewhere"), task_id)
        pipe.zadd(keys.LEASE_DEADLINES, {task_id: now_ms + 600_000})
    pipe.execute()
    return ids


@contextmanager
def monitored(redis: RedisServer, log: Path) -> Iterator[Path]:
    """Every command the server runs, one per line, while the block runs."""
    with log.open("w") as out:
        proc = subprocess.Popen(["redis-cli", "-u", redis.url, "monitor"], stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: log.stat().st_size > 0, 10, "MONITOR to answer")
            yield log
        finally:
            proc.terminate()
            proc.wait(10)


def test_a_task_of_a_host_dead_for_good_is_judged_without_scanning_the_fleet(
        spawn: Callable[..., Any], tmp_path: Path) -> None:
    redis: RedisServer = spawn("redis")
    fleet = simulate_fleet(redis)
    doomed = spawn("worker", redis_url=redis.url, host="doomed", concurrency=1, env=FAST)
    spawn("worker", redis_url=redis.url, host="live1", concurrency=1, env=FAST)
    spawn("worker", redis_url=redis.url, host="live2", concurrency=1, env=FAST)
    server = VirtualServer(redis.url, host="doomed", poll_interval=0.5)
    running = server.ping(duration_ms=120_000, steps=120)
    client = redis.client()
    record = keys.task_record(running.id)
    wait_until(lambda: client.hget(record, "state") == records.STARTED, 20, "the task to start")
    assert client.scard(keys.host_running("doomed")) == 1
    wait_until(lambda: server.host_status()["doomed"]["tasks_running"] == 1, 10,
               "the heartbeat to count the host's own running task")

    with monitored(redis, tmp_path / "monitor.log") as log:
        doomed.kill()  # for good: no worker of this host comes back
        killed = time.time()
        # Read the record raw: a producer's read would judge the task itself.
        wait_until(lambda: client.hget(record, "state") == records.FAILURE,
                   LEASE + HEARTBEAT + 20, "a live host's reaper to judge the task")
        judged = time.time()
        time.sleep(HEARTBEAT)  # a few more beats of every live host, still watched

    assert client.hget(record, "result") == str(int(VMTaskResult.ThreadCrashError))
    # The lease ran out at most LEASE after the kill; a reaper beats every HEARTBEAT/3.
    assert judged - killed <= LEASE + HEARTBEAT / 3 + 2.0, judged - killed
    assert client.sismember(keys.host_running("doomed"), running.id) == 0
    assert client.zscore(keys.LEASE_DEADLINES, running.id) is None

    commands = log.read_text().splitlines()
    beats = [c for c in commands if f'"{keys.host_heartbeat("live1")}"' in c]
    assert len(beats) >= 2, "the live hosts did not beat while watched"
    fleet_keys = {f'"{keys.task_lease(t)}"' for t in fleet}
    touched = [c for c in commands if any(k in c for k in fleet_keys)]
    assert not touched, f"a host read other hosts' live leases: {[c[:160] for c in touched[:3]]}"
    scans = [c for c in commands
             if f'"smembers" "{keys.RUNNING_TASKS}"' in c.lower() or '"mget"' in c.lower()]
    assert not scans, f"a host scanned the fleet's running tasks: {scans[:3]}"
    # The judged task's own lease was looked at: by the judging finish script.
    assert any(f'"{keys.task_lease(running.id)}"' in c for c in commands)
