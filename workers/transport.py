"""kombu's Redis transport, hardened so that no message can stop a worker.

kombu treats a message it cannot decode as fatal: binary garbage fails its JSON
parse, an envelope whose body is not base64 fails `decode_body`, and either way
the worker logs ``Unrecoverable error`` and exits.  Since any client of the
broker can push onto ``host.<name>``, that would let anyone stop any host.

This channel drops such a message (it was already popped, and it never reached
the unacked hash, so nothing redelivers it) and logs it.  Errors raised by
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

import redis
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

from api.connection import PrimaryFollowingConnection

log = logging.getLogger(__name__)

UNDECODABLE = (ValueError, KeyError, TypeError, AttributeError, binascii.Error)


class HardenedChannel:
    """Mixed into kombu's Redis channels (plain and Sentinel): drops undecodable messages."""

    _callback_raised = False

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
