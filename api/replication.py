"""Writes that count only once a replica has them: WAIT in the same round trip.

With Sentinel, the primary acknowledges a write before its replicas have it; if
it dies in between, the replica promoted in its place never saw the write.  A
write the application relies on (a submitted task and its message, a task's
start, its result) is therefore followed by ``WAIT <replicas> <ms>`` on the same
connection, in the same pipeline: WAIT covers every earlier write of that
connection, and since replication is one ordered stream, also everything the
primary applied before them (the message kombu pushed on its own connection).

Our scripts are called by EVALSHA by hand: redis-py's pipelined scripts would
first ask SCRIPT EXISTS, a second round trip each time.  A new primary (after a
failover, or a restart) may not have them cached: then they are loaded and the
batch re-sent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.commands.core import Script


def pipelined(client: redis.Redis, build: Callable[[Any], None],
              scripts: Sequence[Script]) -> list[Any]:
    """The commands ``build`` puts in a pipeline, in one round trip; replies in order."""
    for attempt in (1, 2):
        pipe = client.pipeline(transaction=False)
        build(pipe)
        try:
            return list(pipe.execute())
        except redis.exceptions.NoScriptError:
            if attempt == 2:
                raise
            for script in scripts:
                client.script_load(script.script)
    raise AssertionError("unreachable")


def replicated(client: redis.Redis, build: Callable[[Any], None], scripts: Sequence[Script],
               replicas: int, wait_ms: int) -> tuple[list[Any], bool]:
    """Like `pipelined`, then WAIT for ``replicas`` replicas (at most ``wait_ms``).

    Returns the replies of ``build``'s commands and whether enough replicas
    acknowledged them.  With ``replicas`` 0 there is no WAIT and the answer is True.
    """
    if replicas <= 0:
        return pipelined(client, build, scripts), True

    def with_wait(pipe: Any) -> None:
        build(pipe)
        pipe.execute_command("WAIT", replicas, wait_ms)

    *replies, acked = pipelined(client, with_wait, scripts)
    return replies, int(acked) >= replicas
