"""Messages Redis or a dying worker lost: sent again from their records.

A submit writes a task's record and pushes its message in one script, so a PENDING
record always has its message somewhere: on its host's queue, in kombu's unacked
hash (taken by a worker), or in a worker's hands between the two.  Two things
break that:

- a Redis failover: a worker's BRPOP that reached the replica before the primary
  died, but whose reply never reached the worker;
- a worker killed between its BRPOP and kombu's write of the unacked entry (kombu
  takes a message and only then records it, with a second command).

Either way the message is on no queue, in no unacked hash and in no hand, and
nothing would ever run that task.  So a host's PENDING records (its PENDING
index, `keys.host_pending`, read from its old end) are compared with the messages
Redis holds for the host, and those it cannot find are sent again, rebuilt from
the record by Celery as the producer did:

- once per change of primary, by one worker of each host, some seconds after the
  switch (`LostMessageCheck`);
- whenever a worker of a host is judged gone: its presence in the host's worker
  set lapsed, or one of its tasks was judged crashed (its lease lapsed), and when
  a worker starts (it may replace one killed a moment ago) (`LostMessageWatch`);
- in a slow sweep of the whole fleet, by one worker elected per period.

A task whose message was only in flight (popped a moment before the check) is sent
twice; the start gate runs the first copy to arrive and drops the other, so this
costs a log line, never a second execution.

Cost: a check of one host reads that host's PENDING tasks older than the grace
and its queues: O(own), in a healthy fleet only its backlog.  The sweep reads
every known host's PENDING index (O(hosts + PENDING past the grace)) once per
`SWEEP_SECONDS` for the whole fleet.  Nothing here runs per beat.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterable
from typing import Any

import redis
from celery import Celery

from api.protocol import keys, records
from api.protocol.records import Field
from api.protocol.tasks import BY_NAME
from api.settings import Settings

log = logging.getLogger(__name__)

# How long after a new primary took over the check runs: time for messages that a
# worker held across the switch to start (a started task is no longer PENDING).
SETTLE_SECONDS = 5.0
# How many PENDING tasks one check looks at, oldest first.
HORIZON = 20_000
# How old a PENDING record must be before a check after a worker was judged gone,
# or the sweep, may send its message again: a message a worker has just popped is
# in no unacked entry for a moment.  (A second copy would still be dropped at the
# start gate; this keeps copies rare.)
GRACE_SECONDS = 10.0
# How often, fleet-wide, one elected worker sweeps every host's PENDING tasks.
SWEEP_SECONDS = 60.0
# kombu's Redis transport keeps taken, unacknowledged messages in this hash.
UNACKED_HASH = "unacked"


def queued_task_ids(client: redis.Redis, queues: Iterable[str]) -> set[str]:
    """Ids of the tasks whose message is on one of ``queues`` or taken but unacked."""
    # One MULTI: a message moving from its queue to the unacked hash meanwhile is
    # seen in one place or the other, never in neither.
    pipe = client.pipeline(transaction=True)
    for queue in queues:
        pipe.lrange(queue, 0, -1)
    pipe.hvals(UNACKED_HASH)
    *queued, unacked = pipe.execute()
    found: set[str] = set()
    for payload in [*(m for messages in queued for m in messages), *unacked]:
        try:
            message = json.loads(payload)
            if isinstance(message, list):  # the unacked hash: [message, exchange, key]
                message = message[0]
            found.add(str(message["headers"]["id"]))
        except (ValueError, KeyError, IndexError, TypeError):
            continue  # not a Celery message of ours; nothing to match
    return found


def old_pending(client: redis.Redis, min_age: float, host: str) -> list[str]:
    """``host``'s PENDING tasks submitted more than ``min_age`` seconds ago.  Index
    entries whose record is no longer PENDING (or gone: a record expired) are
    dropped from the index on the way."""
    index = keys.host_pending(host)
    ids = client.zrangebyscore(index, "-inf", time.time() - min_age, start=0, num=HORIZON)
    return _still_pending(client, index, ids)


def _still_pending(client: redis.Redis, index: str, ids: list[str]) -> list[str]:
    if not ids:
        return []
    pipe = client.pipeline(transaction=False)
    for task_id in ids:
        pipe.hget(keys.task_record(task_id), Field.STATE)
    states = pipe.execute()
    stale = [t for t, state in zip(ids, states, strict=True) if state != records.PENDING]
    if stale:
        client.zrem(index, *stale)
    return [t for t, state in zip(ids, states, strict=True) if state == records.PENDING]


def resend_lost(client: redis.Redis, app: Celery, host: str, min_age: float = 0.0,
                pending: Iterable[str] | None = None) -> list[str]:
    """Send again the message of each PENDING task of ``host`` (older than
    ``min_age``; or those of ``pending``) that Redis does not hold.

    Returns the ids sent again.
    """
    wanted = sorted(old_pending(client, min_age, host) if pending is None else pending)
    if not wanted:
        return []
    present = queued_task_ids(client, (keys.host_queue(host), keys.control_queue(host)))
    resent: list[str] = []
    for task_id in wanted:
        if task_id in present:
            continue
        fields = client.hmget(keys.task_record(task_id), Field.STATE, Field.NAME, Field.ARGUMENTS)
        state, name, arguments = fields
        if state != records.PENDING or not name:
            continue  # started, cancelled or gone meanwhile
        kwargs: dict[str, Any] = json.loads(arguments or "{}")
        args = kwargs.pop("args", [])
        spec = BY_NAME.get(name)
        queue = (keys.control_queue(host) if spec is not None and spec.quick
                 else keys.host_queue(host))
        app.send_task(name, args=args, kwargs=kwargs, task_id=task_id, queue=queue,
                      routing_key=queue)
        log.warning("Task %s %s was PENDING with its message nowhere in Redis (lost in "
                    "a switch of Redis primary, or by a worker killed as it took it): "
                    "sent it again", name, task_id)
        resent.append(task_id)
    return resent


def sweep_lost(client: redis.Redis, app: Celery, min_age: float = GRACE_SECONDS
               ) -> list[str]:
    """`resend_lost` for every host with PENDING tasks older than ``min_age``."""
    hosts = sorted(client.smembers(keys.KNOWN_HOSTS))
    if not hosts:
        return []
    pipe = client.pipeline(transaction=False)
    for host in hosts:
        pipe.zrangebyscore(keys.host_pending(host), "-inf", time.time() - min_age,
                           start=0, num=HORIZON)
    resent: list[str] = []
    for host, ids in zip(hosts, pipe.execute(), strict=True):
        pending = _still_pending(client, keys.host_pending(host), ids)
        if pending:
            resent += resend_lost(client, app, host, pending=pending)
    return resent


class LostMessageWatch:
    """The checks after a worker was judged gone, and the elected sweep.

    A check is scheduled for a host (its worker gone, or this worker starting) and
    runs on a beat `GRACE_SECONDS` later, so the gone worker's last messages have
    had time to start or reach the unacked hash from any other worker.
    """

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.due: dict[str, float] = {}

    def schedule(self, host: str) -> None:
        self.due.setdefault(host, time.monotonic() + GRACE_SECONDS)

    def run_due(self, client: redis.Redis) -> None:
        now = time.monotonic()
        for host, at in sorted(self.due.items()):
            if at > now:
                continue
            resent = resend_lost(client, self.app, host, GRACE_SECONDS)
            del self.due[host]  # only once it ran: a Redis error retries next beat
            log.info("Checked the PENDING tasks of %s after a worker was judged gone: "
                     "%d sent again", host, len(resent))

    def sweep(self, client: redis.Redis) -> None:
        resent = sweep_lost(client, self.app)
        if resent:
            log.warning("The periodic sweep sent %d lost message(s) again", len(resent))


class LostMessageCheck:
    """Runs `resend_lost` once per change of primary, from one worker of the host."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.checked_takeover: str | None = None

    def __call__(self, client: redis.Redis, takeover: str, age_seconds: float) -> None:
        """``takeover`` names the primary's takeover (its replication id and since
        when); ``age_seconds`` is how long ago it happened."""
        if takeover == self.checked_takeover or age_seconds < SETTLE_SECONDS:
            return
        self.checked_takeover = takeover
        # One worker per host and takeover: the others find the claim.
        if not client.set(keys.resend_claim(self.settings.host, takeover), "1", nx=True,
                          ex=86400):
            return
        try:
            resent = resend_lost(client, self.app, self.settings.host)
        except Exception:
            # Let the next beat (of any worker of the host) try again.
            self.checked_takeover = None
            with contextlib.suppress(redis.RedisError):
                client.delete(keys.resend_claim(self.settings.host, takeover))
            raise
        log.info("Checked the PENDING tasks of %s after a change of Redis primary: "
                 "%d sent again", self.settings.host, len(resent))
