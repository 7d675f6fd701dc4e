"""The gap between kombu's pop of a message and its unacked record (issue 15).

kombu's Redis transport takes a message off its queue (BRPOP) and records it in
the unacked hash with a second command.  When Redis fails between the two (a
primary dying in a failover), the message is in neither place: only the
consuming process holds it.  `workers.transport` keeps it and pushes it back
once Redis answers.  Here the fault is provoked at exactly that moment: the
redis-server is killed (SIGKILL) as the unacked record is about to be written,
and started again from its append-only file, which has the pop: the state a
replica promoted in its place would have had.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue
from kombu.transport import redis as kombu_redis

from workers import transport
from workers.devtools.sandbox import RedisServer

QUEUE = "host.gap"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", appendonly=True).start()
    yield server
    server.stop()


def test_a_message_popped_as_redis_fails_goes_back_onto_its_queue(
        own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    transport.install()
    queue = Queue(QUEUE, Exchange(QUEUE, type="direct"), routing_key=QUEUE)
    options = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0}
    with Connection(own_redis.url, transport_options=options) as producer_conn:
        producer_conn.Producer().publish({"task": "one"}, exchange=queue.exchange,
                                         routing_key=QUEUE, declare=[queue],
                                         serializer="json")
    inspect = own_redis.client()
    assert inspect.llen(QUEUE) == 1

    where_after_failure: list[tuple[int, int]] = []
    original_append = kombu_redis.QoS.append

    def append_as_redis_dies(self: Any, message: Any, delivery_tag: str) -> None:
        assert own_redis.proc is not None
        os.kill(own_redis.proc.pid, signal.SIGKILL)  # between the pop and the record
        own_redis.proc.wait()
        own_redis.proc = None
        try:
            original_append(self, message, delivery_tag)
        finally:
            own_redis.start()
            where_after_failure.append((inspect.llen(QUEUE), inspect.hlen("unacked")))

    received: list[Any] = []
    with Connection(own_redis.url, transport_options=options) as conn:
        with monkeypatch.context() as patch:
            patch.setattr(kombu_redis.QoS, "append", append_as_redis_dies)
            with conn.Consumer(queue, callbacks=[lambda body, msg: received.append(body)],
                               accept=["json"]):
                with pytest.raises((redis.TimeoutError, redis.ConnectionError)):
                    conn.drain_events(timeout=5)
        # Redis is back with the pop but not the record: kombu alone would have lost
        # the message (off the queue, not in the unacked hash, not delivered).
        assert where_after_failure == [(0, 0)]
        assert received == []
        # The process holds it, or (when kombu retried its BRPOP on the restarted
        # Redis before drain_events gave up) has already pushed it back.
        assert len(transport.taken_unrecorded) + inspect.llen(QUEUE) == 1
    # The worker reconnects (Celery does this after a connection error).
    with Connection(own_redis.url, transport_options=options) as conn:
        with conn.Consumer(queue, callbacks=[lambda body, msg: (received.append(body),
                                                                 msg.ack())],
                           accept=["json"]):
            conn.drain_events(timeout=5)
    assert received == [{"task": "one"}]
    assert transport.taken_unrecorded == []
    assert inspect.llen(QUEUE) == 0 and inspect.hlen("unacked") == 0
