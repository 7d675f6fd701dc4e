"""Writes that count only once a replica has them: WAIT in the same round trip.

With Sentinel, the primary acknowledges a write before its replicas have it; if
it dies in between, the replica promoted in its place never saw the write.  A
write the application relies on (a submitted task and its message, a task's
start, its result) is therefore followed by ``WAIT <replicas> <ms>`` on the same
connection, in the same pipeline: WAIT covers every earlier write of that
connection, and since replication is one ordered stream, also everything the
primary applied before them (the message kombu pushed on its own connection).

Our scripts (`api.scripts`) go into pipelines by EVALSHA by hand: redis-py's
pipelined scripts would first ask SCRIPT EXISTS, a second round trip each time.
A new primary (after a failover, or a restart) may not have them cached: then the
pipeline is sent again with each script's body (EVAL), which also caches it there.
redis-py's own answer to NOSCRIPT, SCRIPT LOAD and then EVALSHA again, is two
commands that a client following a failover can send to two different servers;
the second then fails with NOSCRIPT too, and a task's start or result was lost
that way in a failover test.  EVAL carries the script with the call, so no server
can lack it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import redis
from redis.exceptions import NoScriptError

from api.protocol.taskcalls import acknowledged
from api.scripts import WholeScripts

log = logging.getLogger(__name__)


def pipelined(client: redis.Redis, build: Callable[[Any], None],
              scripts: Iterable[Any], transaction: bool = False) -> list[Any]:
    """The commands ``build`` puts in a pipeline, in one round trip; replies in order.

    ``scripts`` are those ``build`` calls by EVALSHA: sent whole if the server lacks one.
    With ``transaction``, in one MULTI (a script missing from the cache fails the
    call, whose other commands then run again with it: only idempotent ones).
    """
    pipe = client.pipeline(transaction=transaction)
    build(pipe)
    try:
        return list(pipe.execute())
    except NoScriptError:
        log.info("Redis did not have our scripts cached (a new primary?): sending them whole")
    pipe = client.pipeline(transaction=transaction)
    build(WholeScripts(pipe, scripts))
    return list(pipe.execute())


class Acknowledgement:
    """How many replicas must have a write before it counts, as one client sees it.

    ``replicas`` is the wish (``VMTASK_REDIS_WAIT_REPLICAS``), bounded by the
    replicas the primary had connected at the previous write (ROLE, read in the
    same round trip): after a failover in a primary + one replica setup the new
    primary has none until the old one rejoins, and waiting for a replica that
    does not exist would refuse every submit for that long.  Then writes count at
    once, with the durability of a single Redis, until a replica is back.
    """

    def __init__(self, replicas: int, wait_ms: int) -> None:
        self.replicas = replicas
        self.wait_ms = wait_ms
        self.connected = replicas

    def wanted(self) -> int:
        return min(self.replicas, self.connected)


def replicated(client: redis.Redis, build: Callable[[Any], None], scripts: Iterable[Any],
               ack: Acknowledgement) -> tuple[list[Any], bool]:
    """Like `pipelined`, then WAIT for the replicas ``ack`` wants (at most its wait_ms).

    Returns the replies of ``build``'s commands and whether enough replicas
    acknowledged them.  With no replicas wanted there is no WAIT and the answer is True.
    """
    if ack.replicas <= 0:
        return pipelined(client, build, scripts), True
    wanted = ack.wanted()

    def with_wait(pipe: Any) -> None:
        build(pipe)
        pipe.execute_command("ROLE")
        pipe.execute_command("WAIT", wanted, ack.wait_ms)

    *replies, role, acked = pipelined(client, with_wait, scripts)
    ack.connected, enough = acknowledged(role, acked, wanted)
    return replies, enough
