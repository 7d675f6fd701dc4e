"""Messages a Redis failover lost: sent again from their records.

A submit writes a task's record and pushes its message in one script, so a PENDING
record always has its message somewhere: on its host's queue, in kombu's unacked
hash (taken by a worker), or in a worker's hands between the two.  A failover can
break that: a worker's BRPOP that reached the replica before the primary died,
but whose reply never reached the worker, leaves a message that is on no queue,
in no unacked hash and in no hand.  Nothing would ever run that task.

So once per change of primary (a new replication id: a failover, or a restart),
one worker of each host, some seconds after the switch, compares its host's
PENDING records with the messages Redis holds for it and sends again those it
cannot find, rebuilt from the record by Celery as the producer did.  A task whose
message was only in flight (popped a moment before the check) is sent twice; the
start gate runs the first copy to arrive and drops the other, so this costs a
log line, never a second execution.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable
from typing import Any

import redis
from celery import Celery

from api.protocol import keys, records
from api.protocol.tasks import BY_NAME
from api.replication import register_script
from api.settings import Settings
from api.store import matching_tasks

log = logging.getLogger(__name__)

# How long after a new primary took over the check runs: time for messages that a
# worker held across the switch to start (a started task is no longer PENDING).
SETTLE_SECONDS = 5.0
# How many recent tasks the check looks back through, like `VirtualServer.tasks`.
HORIZON = 20_000
# kombu's Redis transport keeps taken, unacknowledged messages in this hash.
UNACKED_HASH = "unacked"


def queued_task_ids(client: redis.Redis, queues: Iterable[str]) -> set[str]:
    """Ids of the tasks whose message is on one of ``queues`` or taken but unacked."""
    pipe = client.pipeline(transaction=False)
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


def resend_lost(client: redis.Redis, app: Celery, host: str) -> list[str]:
    """Send again the message of each PENDING task of ``host`` that Redis does not hold.

    Returns the ids sent again.
    """
    pending = matching_tasks(register_script(client, records.LIST_SCRIPT), records.PENDING,
                             host, HORIZON, HORIZON)
    if not pending:
        return []
    present = queued_task_ids(client, (keys.host_queue(host), keys.control_queue(host)))
    resent: list[str] = []
    for task_id in pending:
        if task_id in present:
            continue
        fields = client.hmget(keys.task_record(task_id), "state", "name", "arguments")
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
                    "the switch of Redis primary): sent it again", name, task_id)
        resent.append(task_id)
    return resent


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
