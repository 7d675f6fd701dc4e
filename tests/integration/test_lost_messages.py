"""A message taken by a worker that dies before kombu records it is sent again, once.

kombu's Redis transport takes a message off its queue (BRPOP) and only then writes
it to the unacked hash.  A worker killed between the two takes the message with it:
on no queue, in no unacked entry, its record PENDING forever (issue 21, point 2).
A pause point (`tests.pause_points.UNACKED_WRITE`) holds the worker's main process
exactly there, so the kill lands in that window every time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from api import VirtualServer, VMTaskResult
from api.protocol import keys
from tests.pause_points import PAUSING, UNACKED_WRITE, pause_env
from workers.devtools.sandbox import RedisServer, WorkerProcess, wait_until
from workers.resend import UNACKED_HASH, queued_task_ids, resend_lost

pytestmark = pytest.mark.slow

FAST = {"VMTASK_HEARTBEAT_SECONDS": "3", "VMTASK_LEASE_SECONDS": "3"}


def held_in_the_window(spawn: Callable[..., Any], redis: RedisServer, host: str,
                       tmp_path: Path, concurrency: int = 1) -> tuple[WorkerProcess, Path]:
    """A worker of ``host`` that stops for good after its first BRPOP, before kombu's
    unacked write; returns it and its pause marker (present while it is held)."""
    marker = tmp_path / "held.pid"
    worker = spawn("worker", redis_url=redis.url, host=host, concurrency=concurrency,
                   env={**FAST, **pause_env(UNACKED_WRITE, marker)}, include=PAUSING)
    return worker, marker


def assert_nowhere(redis: RedisServer, host: str, task_id: str) -> None:
    client = redis.client()
    present = queued_task_ids(client, (keys.host_queue(host), keys.control_queue(host)))
    assert task_id not in present, "the message is still on a queue or in the unacked hash"
    assert client.hget(keys.task_record(task_id), "state") == "PENDING"


def test_a_message_taken_by_a_worker_killed_before_kombu_recorded_it_runs(
        spawn: Callable[..., Any], tmp_path: Path) -> None:
    redis: RedisServer = spawn("redis")
    doomed, held = held_in_the_window(spawn, redis, "grave", tmp_path)
    server = VirtualServer(redis.url, host="grave", poll_interval=0.5)
    ran = tmp_path / "ran.txt"
    task = server.submit("tests.write_marker", description="taken to the grave",
                         cancelable=True, kwargs={"path": str(ran)})
    wait_until(held.exists, 20, "the worker to take the message and stop before unacked")
    doomed.kill()
    assert_nowhere(redis, "grave", task.id)

    # The host's next worker judges the killed one gone and finds the message missing.
    spawn("worker", redis_url=redis.url, host="grave", concurrency=1, env=FAST)
    assert task.wait_for_completion(60_000), "stranded: PENDING with its message nowhere"
    assert task.result is VMTaskResult.Success
    assert ran.read_text().split() == [task.id]
    client = redis.client()
    assert client.hget(keys.task_record(task.id), "runs") == "1"
    # The indexes the start and finish scripts keep have let go of it.
    assert client.zscore(keys.host_pending("grave"), task.id) is None
    assert client.sismember(keys.host_running("grave"), task.id) == 0
    assert client.zscore(keys.LEASE_DEADLINES, task.id) is None


def test_a_worker_whose_presence_lapsed_has_its_message_sent_by_the_other(
        spawn: Callable[..., Any], tmp_path: Path) -> None:
    """Two workers serve the host; the survivor was running before the other died, so
    no start-up check helps: it is the lapsed presence that sends the message again."""
    redis: RedisServer = spawn("redis")
    survivor = spawn("worker", redis_url=redis.url, host="pair", concurrency=1, env=FAST)
    server = VirtualServer(redis.url, host="pair", poll_interval=0.5)
    # Keep the survivor busy so that the held worker is the one to take the message.
    busy = server.submit("tests.uncancelable_sleep", description="busy", cancelable=False,
                         kwargs={"seconds": 4})
    wait_until(lambda: busy.snapshot().state == "STARTED", 20, "the survivor to be busy")
    doomed, held = held_in_the_window(spawn, redis, "pair", tmp_path)
    ran = tmp_path / "ran.txt"
    task = server.submit("tests.write_marker", description="taken to the grave",
                         cancelable=True, kwargs={"path": str(ran)})
    wait_until(held.exists, 20, "the held worker to take the message")
    doomed.kill()
    assert_nowhere(redis, "pair", task.id)
    # Long after the survivor's own start-up check (grace 10 s) has run.
    assert survivor.proc is not None
    assert task.wait_for_completion(60_000), "stranded: PENDING with its message nowhere"
    assert task.result is VMTaskResult.Success
    assert ran.read_text().split() == [task.id]
    assert busy.wait_for_completion(30_000) and busy.result is VMTaskResult.Success


def test_a_message_sent_again_while_the_original_runs_is_dropped_at_the_start_gate(
        spawn: Callable[..., Any], tmp_path: Path) -> None:
    """The check's race: it finds no message because a worker holds it between BRPOP
    and unacked; the copy it sends arrives while the original runs, and never runs."""
    redis: RedisServer = spawn("redis")
    worker, held = held_in_the_window(spawn, redis, "twice", tmp_path, concurrency=2)
    server = VirtualServer(redis.url, host="twice", poll_interval=0.5)
    ran = tmp_path / "ran.txt"
    task = server.submit("tests.marked_echo", description="held", cancelable=False,
                         kwargs={"path": str(ran), "value": 7, "seconds": 3})
    wait_until(held.exists, 20, "the worker to take the message")
    client = redis.client()
    assert resend_lost(client, server.celery, "twice") == [task.id]  # the copy
    held.unlink()  # the original goes on: recorded unacked, started
    wait_until(lambda: client.hget(keys.task_record(task.id), "state") == "STARTED", 20,
               "the original to start")
    # The copy is taken by the worker's second slot while the original still runs.
    wait_until(lambda: client.llen(keys.host_queue("twice")) == 0, 20,
               "the copy to be taken")
    assert task.wait_for_completion(60_000)
    assert task.result is VMTaskResult.Success
    assert task.snapshot().output == {"value": 7}
    assert ran.read_text().split() == [task.id], "the copy ran too"
    assert client.hget(keys.task_record(task.id), "runs") == "1"
    # Both deliveries were acknowledged: nothing is left to redeliver.
    wait_until(lambda: not [v for v in client.hvals(UNACKED_HASH)
                            if json.loads(v)[0]["headers"]["id"] == task.id], 20,
               "both copies to be acknowledged")
    assert worker.proc is not None and worker.proc.poll() is None
