"""The producer's cost per task, counted on the wire: commands and blocking round
trips, and the batch read of many tasks at once."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest

from api import VirtualServer, VMTaskResult, errors
from api.protocol import keys
from api.publish import message_commands
from tests.cli_runs import cli_env
from tests.helpers import wire_counter
from workers.devtools.sandbox import RedisServer, WorkerProcess


def test_submit_and_wait_costs_at_most_eight_commands(
        server: VirtualServer, alpha: WorkerProcess) -> None:
    for _ in range(3):  # warm: connections, scripts, the producer app
        assert server.ping().wait_for_completion(20_000)
    rounds = 20
    with wire_counter() as counter:
        for _ in range(rounds):
            assert server.ping().wait_for_completion(20_000)
    commands = sum(v for k, v in counter.items() if k != "<sends>") / rounds
    assert commands <= 8, counter
    # The host's liveness, the record and the message (with its task-sent event) in
    # one script; no index trimming; one read.
    assert counter["EVALSHA"] == 2 * rounds, counter
    assert counter["LPUSH"] == counter["PUBLISH"] == counter["EXISTS"] == 0, counter
    assert counter["ZREMRANGEBYSCORE"] == counter["SMEMBERS"] == 0, counter
    # Submit: one round trip; wait: subscribe, then one read (and the unsubscribe).
    assert counter["<sends>"] <= 4 * rounds, counter


def test_a_submit_writes_its_record_and_message_together_and_once(
        redis_server: RedisServer, alpha: WorkerProcess) -> None:
    """A refused submit leaves nothing; an accepted one leaves the record, its index
    entry, the message and its task-sent event; the same submit re-sent (redis-py
    retries a call whose reply was lost) pushes no second message."""
    client = redis_server.client()
    with VirtualServer(redis_server.url, host="alpha") as server:
        message = message_commands(server.celery, "vmtask.ping", kwargs={"delay_ms": 0},
                                   task_id="t-refused", queue="host.gone",
                                   routing_key="host.gone")
        assert [c for c, _, _ in message] == ["lpush", "publish"]  # the task-sent event
        assert not server.store.create("t-refused", name="vmtask.ping", description="x",
                                       host="gone", cancelable=True, arguments={},
                                       message=message)
        assert client.exists(keys.task_record("t-refused"), "host.gone") == 0
        assert client.zscore(keys.RECENT_TASKS, "t-refused") is None

        events = client.pubsub()
        events.psubscribe("/0.celeryev/task.*")
        events.get_message(timeout=5)
        queue = "host.nobody-consumes"
        message = message_commands(server.celery, "vmtask.ping", kwargs={"delay_ms": 0},
                                   task_id="t-once", queue=queue, routing_key=queue)
        for _ in range(2):
            assert server.store.create("t-once", name="vmtask.ping", description="x",
                                       host="alpha", cancelable=True, arguments={},
                                       message=message)
        assert client.llen(queue) == 1
        body = json.loads(client.lindex(queue, 0))
        assert body["headers"]["id"] == "t-once" and body["content-type"] == "application/json"
        assert client.hget(keys.task_record("t-once"), "state") == "PENDING"
        assert client.zscore(keys.RECENT_TASKS, "t-once") is not None
        sent = [m for m in iter(lambda: events.get_message(timeout=1), None)
                if m["type"] == "pmessage"]
        decoded = [json.loads(base64.b64decode(json.loads(m["data"])["body"])) for m in sent]
        # Only t-once's events: the worker may still announce an earlier test's tasks.
        assert [e["type"] for e in decoded if e.get("uuid") == "t-once"] == ["task-sent"]
        events.close()
        client.delete(queue)


def test_task_snapshots_reads_many_in_one_round_trip_in_order(server: VirtualServer) -> None:
    tasks = [server.ping(steps=1) for _ in range(5)]
    for task in tasks:
        assert task.wait_for_completion(20_000)
    ids = [t.id for t in tasks]
    asked = [ids[0], "no-such-task", *ids[1:], ids[0]]
    with wire_counter() as counter:
        snaps = server.task_snapshots(asked)
    assert counter["<sends>"] == 1, counter
    assert snaps[1] is None
    assert [s.id if s else None for s in snaps] == [ids[0], None, *ids[1:], ids[0]]
    assert all(s.result is VMTaskResult.Success and s.output == {"steps": 1}
               for s in snaps if s)
    assert server.task_snapshots([]) == []
    server.redis.script_flush()  # as after a Redis restart without persistence
    assert [s.id if s else None for s in server.task_snapshots(ids)] == ids
    for bad in ("one-string", [1, 2], [None]):
        with pytest.raises(errors.InvalidArgumentError):
            server.task_snapshots(bad)  # type: ignore[arg-type]


def test_the_cli_shows_many_tasks_at_once(server: VirtualServer, redis_server: RedisServer,
                                          alpha: WorkerProcess) -> None:
    tasks = [server.ping() for _ in range(3)]
    for task in tasks:
        assert task.wait_for_completion(20_000)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "api.cli", "--url", redis_server.url,
                               "--host", "alpha", *args], env=cli_env(), capture_output=True,
                              text=True, timeout=60, check=False)

    shown = cli("--json", "task", "show", *(t.id for t in tasks))
    assert shown.returncode == 0, shown.stderr
    documents = json.loads(shown.stdout)
    assert [d["id"] for d in documents] == [t.id for t in tasks]
    missing = cli("--json", "task", "show", tasks[0].id, "nope")
    assert missing.returncode == 4
    assert json.loads(missing.stdout)[1] is None

