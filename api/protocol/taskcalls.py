"""The producer's task-record script calls: their keyword arguments, and what their
replies mean.

Each function here gives the keyword arguments of one script of the registry
(`api.scripts.Scripts`, whose ``Lua(keys=..., args=...)`` line is the one
description of its KEYS and ARGV): the sync store (`api.store.TaskStore`) passes them
to ``Scripts.of(client)``, the asyncio one (`api.aio_store`) to
``AsyncScripts.of(client)``, so the two send the same calls and cannot drift apart.
What producers and workers both send (a task's end, a crash judgment, a cancel, a
listing) is `api.protocol.records`'.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from api.enums import VMTaskResult
from api.protocol import hresults, keys, records
from api.protocol.records import Field, TaskSnapshot

# What kombu's Redis transport sends for one message (`api.publish`).
PublishCommand = tuple[str, str, Any]
PUBLISH_COMMANDS = frozenset({"lpush", "pexpire", "publish"})
PENDING_RECORD_TTL_SECONDS = 30 * 86400  # a queued task may wait for a host that is down
UNCONFIRMED_DESCRIPTION = ("Withdrawn before it started: no Redis replica acknowledged the "
                           "submit (the primary was failing over)")


def submit_arguments(task_id: str, *, name: str, description: str, host: str,
                     cancelable: bool, arguments: Mapping[str, Any],
                     message: Sequence[PublishCommand] = (),
                     extra: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`task_submit`: the host's liveness, a PENDING record (with ``extra`` fields: a
    child's parent) and its message."""
    now = time.time()
    fields = {
        Field.NAME: name,
        Field.DESCRIPTION: description,
        Field.HOST: host,
        Field.CANCELABLE: "1" if cancelable else "0",
        Field.STATE: records.PENDING,
        Field.PERCENT: "0",
        Field.CREATED: repr(now),
        Field.ARGUMENTS: json.dumps(dict(arguments), sort_keys=True),
        **(extra or {}),
    }
    items: list[Any] = [item for pair in fields.items() for item in pair]
    field_count = len(items)
    for command, target, value in message:
        if command not in PUBLISH_COMMANDS:
            raise ValueError(f"not a publish command: {command!r}")
        items += [command, target, value]
    return {"record": keys.task_record(task_id), "recent": keys.RECENT_TASKS,
            "host_pending": keys.host_pending(host), "now": repr(now),
            "ttl": PENDING_RECORD_TTL_SECONDS, "task_id": task_id,
            "heartbeat": keys.host_heartbeat(host), "field_count": field_count,
            "items": items}


def read_arguments(task_id: str) -> dict[str, Any]:
    """`task_read`: the record's fields, then whether a lease is alive."""
    return {"record": keys.task_record(task_id), "lease": keys.task_lease(task_id)}


def snapshot_of(task_id: str, reply: Sequence[str]) -> TaskSnapshot | None:
    """A snapshot from `task_read`'s reply: field/value pairs, then the lease flag."""
    *pairs, lease = reply
    if not pairs:
        return None
    fields = dict(zip(pairs[::2], pairs[1::2], strict=True))
    return TaskSnapshot.from_record(task_id, fields, lease == "1")


def withdraw_arguments(task_id: str, retention_seconds: int) -> dict[str, Any]:
    """`task_withdraw`: take back a submit no replica acknowledged."""
    return {"record": keys.task_record(task_id), "channel": keys.task_channel(task_id),
            "now": repr(time.time()), "retention": retention_seconds,
            "result": int(VMTaskResult.Cancelled), "error": hresults.E_ABORT,
            "description": UNCONFIRMED_DESCRIPTION, "task_id": task_id,
            "host_pending_prefix": keys.HOST_PENDING_PREFIX}


def log_arguments(task_id: str, after: int = 0, tail: int | None = None) -> dict[str, Any]:
    """`task_log_read`: the entries numbered after ``after``, the last ``tail`` at most."""
    return {"record": keys.task_record(task_id), "log": keys.task_log(task_id),
            "after": after, "tail": "" if tail is None else tail}


def hosts_arguments() -> dict[str, Any]:
    """`hosts_live`: every live host and its heartbeat (no declared keys: the
    producer's ACL user may only read them)."""
    return {"known_hosts": keys.KNOWN_HOSTS, "heartbeat_prefix": keys.host_heartbeat("")}


def live_hosts_of(reply: Sequence[str]) -> dict[str, str]:
    return dict(sorted(zip(reply[::2], reply[1::2], strict=True)))


def acknowledged(role: Sequence[Any], acked: object, wanted: int) -> tuple[int, bool]:
    """From ROLE and WAIT after a write: the replicas connected, and whether enough acked."""
    connected = len(role[2]) if role and role[0] in ("master", b"master") else 0
    return connected, int(str(acked)) >= min(wanted, connected)
