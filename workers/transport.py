"""kombu's Redis transport, hardened so that no message can stop a worker.

kombu treats a message it cannot decode as fatal: binary garbage fails its JSON
parse, an envelope whose body is not base64 fails `decode_body`, and either way
the worker logs ``Unrecoverable error`` and exits.  Since any client of the
broker can push onto ``host.<name>``, that would let anyone stop any host.

This channel drops such a message (it was already popped, and it never reached
the unacked hash, so nothing redelivers it) and logs it.

It also closes a gap of kombu's at a Redis failover: a message is popped (BRPOP)
and only then recorded in the unacked hash, by a second command.  When the
primary dies between the two, the pop may have reached the replica that takes
over while the record did not: the message is then nowhere but in this process,
which kombu drops with the failed record.  Here it is kept and pushed back onto
its queue once a primary answers again; the start gate drops any second copy.  Errors raised by
Celery's own handling of a *decoded* message are not swallowed.  Celery handles
well-formed messages with an unknown task or an undecodable body itself (it logs
and acknowledges them), and a forged task with no record meets the start gate.
"""

from __future__ import annotations

import binascii
import logging
from collections.abc import Callable
from queue import Empty
from typing import Any

import kombu.transport as kombu_transport
import redis
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

from api.connection import PrimaryFollowingConnection

log = logging.getLogger(__name__)

UNDECODABLE = (ValueError, KeyError, TypeError, AttributeError, binascii.Error)
CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError)

# (payload, exchange, routing key) of messages popped whose unacked record could
# not be written: this process holds the only copy until it is pushed back.
taken_unrecorded: list[tuple[Any, str, str]] = []


class HardenedQoS(kombu_redis.QoS):
    def append(self, message: Any, delivery_tag: str) -> None:
        try:
            super().append(message, delivery_tag)  # type: ignore[no-untyped-call]
        except CONNECTION_ERRORS:
            delivery = message.delivery_info
            taken_unrecorded.append(
                (message._raw, delivery["exchange"], delivery["routing_key"]))
            log.warning("Redis failed after a message was taken off %s: it goes back "
                        "onto the queue once Redis answers", delivery["routing_key"])
            raise


class HardenedChannel:
    """Mixed into kombu's Redis channels (plain and Sentinel): drops undecodable messages."""

    _callback_raised = False
    QoS = HardenedQoS

    def _brpop_start(self, timeout: Any = None) -> Any:
        if taken_unrecorded:
            self._put_back_taken()
        return super()._brpop_start(timeout)  # type: ignore[misc]

    def _put_back_taken(self) -> None:
        """Push the messages whose unacked record failed back onto their queues."""
        pending = list(taken_unrecorded)
        try:
            with self.conn_or_acquire() as client:  # type: ignore[attr-defined]
                pipe = client.pipeline()
                for payload, exchange, routing_key in pending:
                    self._do_restore_message(  # type: ignore[attr-defined]
                        payload, exchange, routing_key, pipe)
                pipe.execute()
        except CONNECTION_ERRORS as exc:
            log.warning("Could not put %d message(s) back yet: %s", len(pending), exc)
            return
        del taken_unrecorded[:len(pending)]
        log.warning("Put %d message(s) back onto their queues after a Redis failure",
                    len(pending))

    def basic_consume(self, queue: str, no_ack: bool, callback: Callable[[Any], Any],
                      consumer_tag: str, **kwargs: Any) -> Any:
        def tracked(message: Any) -> Any:
            try:
                return callback(message)
            except BaseException:
                self._callback_raised = True
                raise

        return super().basic_consume(  # type: ignore[misc]
            queue, no_ack, tracked, consumer_tag, **kwargs)

    def _connparams(self, asynchronous: bool = False) -> Any:
        # Closing a channel after its connection was released (a broker lost in a
        # failover) requeues its unacked messages through a new pool, whose
        # parameters come from the released connection: kombu then fails with an
        # AttributeError that Celery treats as fatal ("Unrecoverable error") and
        # the worker exits.  A connection error instead is ignored by Celery; the
        # messages stay in the unacked hash for the visibility restore.
        if self.connection.client is None:  # type: ignore[attr-defined]
            raise redis.ConnectionError("The broker connection was already closed")
        return super()._connparams(asynchronous)  # type: ignore[misc]

    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)  # type: ignore[misc]
        except UNDECODABLE as exc:
            if self._callback_raised:  # Celery's error with a decoded message: not ours
                self._callback_raised = False
                raise
            log.error("Dropped a message that is not a valid kombu envelope: %s: %s",
                      type(exc).__name__, exc)
            raise Empty() from None


class Channel(HardenedChannel, kombu_redis.Channel):
    pass


class SentinelChannel(HardenedChannel, kombu_redis.SentinelChannel):
    # Every reconnect asks the sentinels (redis-py's own class keeps retrying the
    # address of a primary that died: see `PrimaryFollowingConnection`).
    connection_class = PrimaryFollowingConnection


class Transport(kombu_redis.Transport):
    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


def install() -> None:
    """Make ``redis://``, ``rediss://`` and ``sentinel://`` broker URLs use these
    transports.

    By alias rather than by Celery's ``broker_transport``, so that the URL's scheme
    keeps its meaning (``rediss`` still means TLS, ``sentinel`` asks the sentinels).
    """
    for scheme in ("redis", "rediss"):
        TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"
    TRANSPORT_ALIASES["sentinel"] = f"{__name__}:SentinelTransport"
    # kombu resolves an alias once per process and caches the class: a connection
    # made before this call (a producer in the same process) must not pin the
    # stock transport for every later one.
    for scheme in ("redis", "rediss", "sentinel"):
        kombu_transport._transport_cache.pop(scheme, None)
