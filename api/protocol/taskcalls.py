"""The producer's task-record script calls as data: their keys and arguments, and
what their replies mean.

The sync store (`api.store.TaskStore`) and the asyncio one (`api.aio_store`) send
the same calls with different clients; everything but the sending is here, so the
two cannot drift apart.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from api.enums import VMTaskResult
from api.protocol import hresults, keys, records
from api.protocol.records import TaskSnapshot

Call = tuple[list[str], list[Any]]  # a script's keys and arguments
# What kombu's Redis transport sends for one message (`api.publish`).
PublishCommand = tuple[str, str, Any]
PUBLISH_COMMANDS = frozenset({"lpush", "pexpire", "publish"})
PENDING_RECORD_TTL_SECONDS = 30 * 86400  # a queued task may wait for a host that is down
UNCONFIRMED_DESCRIPTION = ("Withdrawn before it started: no Redis replica acknowledged the "
                           "submit (the primary was failing over)")
CRASH_DESCRIPTION = "The worker running the task stopped (killed, out of memory, or host lost)"


def submit(task_id: str, *, name: str, description: str, host: str, cancelable: bool,
           arguments: Mapping[str, Any], message: Sequence[PublishCommand] = ()) -> Call:
    """`task_submit.lua`: the host's liveness, a PENDING record and its message."""
    now = time.time()
    fields = {
        "name": name,
        "description": description,
        "host": host,
        "cancelable": "1" if cancelable else "0",
        "state": records.PENDING,
        "percent": "0",
        "created": repr(now),
        "arguments": json.dumps(dict(arguments), sort_keys=True),
    }
    items = [item for pair in fields.items() for item in pair]
    args: list[Any] = [repr(now), PENDING_RECORD_TTL_SECONDS, task_id,
                       keys.host_heartbeat(host), len(items), *items]
    for command, target, value in message:
        if command not in PUBLISH_COMMANDS:
            raise ValueError(f"not a publish command: {command!r}")
        args += [command, target, value]
    return [keys.task_record(task_id), keys.RECENT_TASKS, keys.host_pending(host)], args


def read(task_id: str) -> Call:
    """`task_read.lua`: the record's fields, then whether a lease is alive."""
    return [keys.task_record(task_id), keys.task_lease(task_id)], []


def snapshot_of(task_id: str, reply: Sequence[str]) -> TaskSnapshot | None:
    """A snapshot from `task_read.lua`'s reply: field/value pairs, then the lease flag."""
    *pairs, lease = reply
    if not pairs:
        return None
    fields = dict(zip(pairs[::2], pairs[1::2], strict=True))
    return TaskSnapshot.from_record(task_id, fields, lease == "1")


def cancel(task_id: str, retention_seconds: int, revoke_queued: bool = False) -> Call:
    """`task_cancel.lua`; ``revoke_queued`` is Celery's revoke, which also drops a
    queued task whose operation is not cancelable (it never ran)."""
    return ([keys.task_record(task_id), keys.task_channel(task_id)],
            [repr(time.time()), retention_seconds, int(VMTaskResult.Cancelled),
             hresults.E_ABORT, "1" if revoke_queued else "0", task_id,
             keys.HOST_PENDING_PREFIX])


def judge_crashed(task_id: str, retention_seconds: int, grace_seconds: float) -> Call:
    """`task_finish.lua` as a crash judgment: it re-checks the lease atomically, and no
    task is judged within ``grace_seconds`` (the lease) of a new primary appearing."""
    return ([keys.task_record(task_id), keys.task_lease(task_id), keys.RUNNING_TASKS,
             keys.task_channel(task_id), keys.REDIS_PRIMARY, keys.LEASE_DEADLINES],
            [records.FAILURE, int(VMTaskResult.ThreadCrashError), hresults.SERVER_FAULT,
             CRASH_DESCRIPTION, repr(time.time()), 0, retention_seconds, task_id, "1", "",
             max(1, math.ceil(grace_seconds)), keys.HOST_RUNNING_PREFIX])


def withdraw(task_id: str, retention_seconds: int) -> Call:
    """`task_withdraw.lua`: take back a submit no replica acknowledged."""
    return ([keys.task_record(task_id), keys.task_channel(task_id)],
            [repr(time.time()), retention_seconds, int(VMTaskResult.Cancelled),
             hresults.E_ABORT, UNCONFIRMED_DESCRIPTION, task_id, keys.HOST_PENDING_PREFIX])


def matching(state: str | None, host: str | None, limit: int, horizon: int) -> Call:
    """`task_list.lua`: ids of the newest tasks in ``state`` on ``host``."""
    return [keys.RECENT_TASKS], [keys.task_record(""), state or "", host or "", limit, horizon]


def hosts_live() -> Call:
    """`hosts_live.lua`: every live host and its heartbeat (no declared keys: the
    producer's ACL user may only read them)."""
    return [], [keys.KNOWN_HOSTS, keys.host_heartbeat("")]


def live_hosts_of(reply: Sequence[str]) -> dict[str, str]:
    return dict(sorted(zip(reply[::2], reply[1::2], strict=True)))


def acknowledged(role: Sequence[Any], acked: object, wanted: int) -> tuple[int, bool]:
    """From ROLE and WAIT after a write: the replicas connected, and whether enough acked."""
    connected = len(role[2]) if role and role[0] in ("master", b"master") else 0
    return connected, int(str(acked)) >= min(wanted, connected)
