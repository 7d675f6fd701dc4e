"""A task's message as the Redis commands kombu would send, collected, not sent.

A submit writes the task's record and pushes its message in one script
(``task_submit.lua``), so that neither exists without the other and a submit is one
round trip.  That needs the message as data first.  kombu's Redis transport already
produces it as data for its publish batches (``Producer.batch()``, kombu 5.7): the
channel serializes and routes each message, then hands the batch the final
commands (LPUSH of the message on its queue; PUBLISH of a task event).
`message_commands` stands in for that batch, so Celery builds the message and its
task-sent event exactly as ``send_task`` does, kombu serializes and routes them,
and the commands come back here instead of going to Redis.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from api.protocol.taskcalls import PublishCommand


class _Collector:
    """Both halves of a kombu publish batch, keeping what they are given."""

    def __init__(self) -> None:
        self.commands: list[PublishCommand] = []

    def publish(self, channel: Any, message: Any, **options: Any) -> Any:
        """As the producer's batch state: route each message published while it is set."""
        return channel.basic_publish(message, _publish_batch=self, **options)

    def add(self, name: str, target: str, value: Any) -> None:
        """As the transport's batch: take one final command of the message routed."""
        self.commands.append((name, target, value))


def _release_idle(channel: Any) -> None:
    """Close the idle connections kombu's channel opened (its first PING, a queue's
    first declaration): nothing is sent through them after that, and a producer
    that waits for many tasks holds only its command and pub/sub connections."""
    for name in ("_pool", "_async_pool"):
        pool = getattr(channel, name, None)
        if pool is not None:
            pool.disconnect(inuse_connections=False)


def message_commands(app: Celery, name: str, **options: Any) -> list[PublishCommand]:
    """The Redis commands that ``app.send_task(name, **options)`` would send.

    Only declaring a queue the first time (kombu's binding table) reaches Redis.
    """
    collector = _Collector()
    with app.producer_or_acquire() as producer:
        if not hasattr(producer.channel, "create_publish_batch"):
            raise RuntimeError("vmtask needs kombu's Redis transport with publish batches "
                               "(kombu >= 5.7)")
        producer._batch_local.current = collector
        try:
            app.send_task(name, producer=producer, **options)
        finally:
            del producer._batch_local.current
            _release_idle(producer.channel)
    if not any(command == "lpush" for command, _, _ in collector.commands):
        raise RuntimeError(f"kombu routed the message of {name} to no queue")
    return collector.commands
