"""After a change of Redis primary, PENDING tasks whose message Redis lost are sent again.

The failover itself is in test_sentinel.py; here the comparison of records with
messages, on one real Redis: a message on its queue, one taken (kombu's unacked
hash), and one nowhere.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

from api import VirtualServer
from api.protocol import keys
from api.protocol.tasks import DISK_INFO, PING
from api.publish import message_commands
from workers.devtools.sandbox import RedisServer
from workers.resend import UNACKED_HASH, queued_task_ids, resend_lost

HOST = "h1"


def submit(server: VirtualServer, task_id: str, name: str, queue: str,
           kwargs: dict[str, Any]) -> None:
    message = message_commands(server.celery, name, kwargs=kwargs, task_id=task_id,
                               queue=queue, routing_key=queue)
    assert server.store.create(task_id, name=name, description=task_id, host=HOST,
                               cancelable=False, arguments=kwargs, message=message)


def test_only_the_pending_tasks_whose_message_is_nowhere_are_sent_again(
        spawn: Callable[..., Any]) -> None:
    redis_server: RedisServer = spawn("redis")
    client = redis_server.client()
    client.set(keys.host_heartbeat(HOST), json.dumps({"host": HOST}), px=60_000)
    long_queue, control = keys.host_queue(HOST), keys.control_queue(HOST)
    with VirtualServer(redis_server.url) as server:
        submit(server, "on-queue", PING.name, long_queue, {"duration_ms": 1, "steps": 1})
        submit(server, "taken", PING.name, long_queue, {"duration_ms": 2, "steps": 1})
        submit(server, "lost", PING.name, long_queue, {"duration_ms": 3, "steps": 2})
        submit(server, "lost-quick", DISK_INFO.name, control, {"path": "a.qcow2"})
        submit(server, "started", PING.name, long_queue, {"duration_ms": 4, "steps": 1})
        # kombu's BRPOP takes from the right; the oldest message is "on-queue".
        messages = {json.loads(m)["headers"]["id"]: m
                    for m in client.lrange(long_queue, 0, -1)}
        client.delete(long_queue, control)
        client.lpush(long_queue, messages["on-queue"])
        # A taken message, as kombu's QoS records it: [payload, exchange, routing key].
        client.hset(UNACKED_HASH, "tag-1",
                    json.dumps([json.loads(messages["taken"]), "", long_queue]))
        client.hset(keys.task_record("started"), "state", "STARTED")
        client.hset(UNACKED_HASH, "garbage", "not json")  # someone else's: ignored

        assert queued_task_ids(client, (long_queue, control)) == {"on-queue", "taken"}
        resent = resend_lost(client, server.celery, HOST)

    assert sorted(resent) == ["lost", "lost-quick"]
    again = [json.loads(m) for m in client.lrange(long_queue, 0, -1)]
    assert [m["headers"]["id"] for m in again] == ["lost", "on-queue"]
    lost = again[0]
    assert lost["headers"]["task"] == PING.name
    assert lost["content-type"] == "application/json"
    args, kwargs, _ = json.loads(base64.b64decode(lost["body"]))
    assert (args, kwargs) == ([], {"duration_ms": 3, "steps": 2})
    (quick,) = [json.loads(m) for m in client.lrange(control, 0, -1)]
    assert quick["headers"]["id"] == "lost-quick"
    assert quick["headers"]["task"] == DISK_INFO.name
    # A second look finds every message: nothing is sent twice.
    with VirtualServer(redis_server.url) as server:
        assert resend_lost(client, server.celery, HOST) == []
    assert client.llen(long_queue) == 2
