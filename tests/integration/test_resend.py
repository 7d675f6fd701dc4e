"""After a change of Redis primary, PENDING tasks whose message Redis lost are sent again.

The failover itself is in test_sentinel.py; here the comparison of records with
messages, on one real Redis: a message on its queue, one taken (kombu's unacked
hash), and one nowhere.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any

from api import VirtualServer
from api.protocol import keys
from api.protocol.tasks import DISK_INFO, PING
from api.publish import message_commands
from workers.devtools.sandbox import RedisServer
from workers.resend import UNACKED_HASH, queued_task_ids, resend_lost, sweep_lost

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


def test_the_sweep_sends_again_only_the_lost_messages_past_the_grace_on_every_host(
        spawn: Callable[..., Any]) -> None:
    """The elected sweep (issue 21, point 2): every host's PENDING index, old end only."""
    redis_server: RedisServer = spawn("redis")
    client = redis_server.client()
    hosts = ("h1", "h2")
    for host in hosts:
        client.set(keys.host_heartbeat(host), json.dumps({"host": host}), px=60_000)
        client.sadd(keys.KNOWN_HOSTS, host)
    with VirtualServer(redis_server.url) as server:
        for host, task_id in (("h1", "old-lost-1"), ("h2", "old-lost-2"), ("h2", "young-lost"),
                              ("h2", "old-queued")):
            queue = keys.host_queue(host)
            message = message_commands(server.celery, PING.name, kwargs={"duration_ms": 1},
                                       task_id=task_id, queue=queue, routing_key=queue)
            assert server.store.create(task_id, name=PING.name, description=task_id,
                                       host=host, cancelable=True,
                                       arguments={"duration_ms": 1}, message=message)
        kept = [m for m in client.lrange(keys.host_queue("h2"), 0, -1)
                if json.loads(m)["headers"]["id"] == "old-queued"]
        client.delete(keys.host_queue("h1"), keys.host_queue("h2"))
        client.lpush(keys.host_queue("h2"), *kept)
        # Submitted a minute ago, as far as the index knows; "young-lost" just now.
        for host, task_id in (("h1", "old-lost-1"), ("h2", "old-lost-2"), ("h2", "old-queued")):
            client.zadd(keys.host_pending(host), {task_id: time.time() - 60})
        assert client.zscore(keys.host_pending("h2"), "young-lost") is not None

        assert sorted(sweep_lost(client, server.celery, min_age=10)) == ["old-lost-1",
                                                                         "old-lost-2"]
        assert sweep_lost(client, server.celery, min_age=10) == []  # found on the queues now
        # Sent again, it is still PENDING: in its host's index until a worker starts it.
        assert client.zrange(keys.host_pending("h1"), 0, -1) == ["old-lost-1"]
