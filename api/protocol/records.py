"""The task record: its fields, its states, and the atomic scripts that change it.

A record is a Redis hash written by the producer when it enqueues a task.  Every
change after that is one Lua script, so each transition is atomic and costs one
round trip:

    PENDING --start--> STARTED --finish--> SUCCESS | FAILURE | REVOKED
    PENDING --cancel-> REVOKED              (the worker's start gate then skips it)
    STARTED --judge--> FAILURE/ThreadCrash  (only once the lease has expired)

The start gate is what makes delivery at-most-once: a message delivered twice, or
for a task already cancelled or judged crashed, finds the record not PENDING and
is dropped without running.

The scripts are `api.scripts.Scripts`'; what the producer and the workers both do
with them (end a task, judge a crash, cancel, list, trim the index) is here, once.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from api.enums import VMTaskResult
from api.protocol import hresults, keys

if TYPE_CHECKING:
    import redis

    from api.scripts import Scripts

PENDING = "PENDING"
STARTED = "STARTED"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
REVOKED = "REVOKED"
COMPLETE_STATES = frozenset({SUCCESS, FAILURE, REVOKED})
# What the start gate answers the one delivery that may run the task.
BEGUN = "BEGUN"


class Field:
    """The record's fields (the Lua scripts spell the same names)."""

    # Written by the submit (`api.store.TaskStore.create`).
    NAME = "name"  # the operation, `api.protocol.tasks.TaskSpec.name`
    DESCRIPTION = "description"
    HOST = "host"
    CANCELABLE = "cancelable"  # "1" or "0"; sealed to "0" by `lua/task_seal.lua`
    STATE = "state"
    PERCENT = "percent"
    CREATED = "created"  # seconds since the epoch, as repr(float)
    ARGUMENTS = "arguments"  # JSON of the operation's keyword arguments
    # Written by the start gate.
    STARTED = "started"
    WORKER = "worker"  # the lease holder, `api.protocol.lease.Holder`
    NODE = "node"  # the worker's Celery node name (Flower's)
    RUNS = "runs"  # how many deliveries passed the gate (1, or more after a crash)
    # Written by the end (finish, cancel, withdraw, crash judgment).
    FINISHED = "finished"
    RESULT = "result"  # an `api.enums.VMTaskResult`
    ERROR = "error"  # an HRESULT
    ERROR_DESCRIPTION = "error_description"
    OUTPUT = "output"  # JSON of a successful operation's small result
    CANCEL_REQUESTED = "cancel_requested"  # "1" once a cancel was asked
    LOG_DROPPED = "log_dropped"  # entries the task log's cap dropped
    # A composite task's (`workers.composite`), written at the submit.
    PARENT = "parent"  # a child's parent task id
    ROOT = "root"  # a child's root task id (Celery's root_id)
    CHILDREN = "children"  # JSON list of a parent's child ids, each listed before it is queued

# Messages on a task's channel.
MSG_PROGRESS = "progress"
MSG_CANCEL = "cancel"
MSG_DONE = "done"

MAX_RECENT_TASKS = 100_000
CANCELLED = ("REVOKED", "REQUESTED")  # what a cancel answers when it took
CRASH_DESCRIPTION = "The worker running the task stopped (killed, out of memory, or host lost)"


@dataclass(frozen=True)
class TaskSnapshot:
    """Every IVMTask2 property of one task, read at one instant."""

    id: str
    name: str
    description: str
    host: str
    state: str
    percent_completed: int
    is_cancelable: bool
    result: VMTaskResult | None
    error: int
    error_description: str
    created: float
    started: float | None
    finished: float | None
    cancel_requested: bool
    lease_alive: bool
    output: Any = None
    """The small JSON value a successful operation returned (e.g. disk information)."""
    parent: str | None = None
    """The composite task that started this one (`workers.composite`), if any."""
    children: tuple[str, ...] = ()
    """The tasks this composite task started, in the order it started them."""

    @property
    def is_complete(self) -> bool:
        return self.state in COMPLETE_STATES

    @property
    def is_crashed_candidate(self) -> bool:
        """Started, yet no live worker holds its lease."""
        return self.state == STARTED and not self.lease_alive

    @classmethod
    def from_record(cls, task_id: str, fields: dict[str, str], lease_alive: bool) -> TaskSnapshot:
        state = fields.get(Field.STATE, PENDING)
        complete = state in COMPLETE_STATES
        result = fields.get(Field.RESULT)

        def maybe_float(name: str) -> float | None:
            value = fields.get(name)
            return float(value) if value else None

        return cls(
            id=task_id,
            name=fields.get(Field.NAME, ""),
            description=fields.get(Field.DESCRIPTION, ""),
            host=fields.get(Field.HOST, ""),
            state=state,
            percent_completed=int(float(fields.get(Field.PERCENT, "0"))),
            is_cancelable=fields.get(Field.CANCELABLE) == "1" and not complete,
            result=VMTaskResult(int(result)) if complete and result not in (None, "") else None,
            error=int(fields.get(Field.ERROR) or 0),
            error_description=fields.get(Field.ERROR_DESCRIPTION, ""),
            created=float(fields.get(Field.CREATED) or 0.0),
            started=maybe_float(Field.STARTED),
            finished=maybe_float(Field.FINISHED),
            cancel_requested=fields.get(Field.CANCEL_REQUESTED) == "1",
            lease_alive=lease_alive,
            output=json.loads(fields[Field.OUTPUT]) if fields.get(Field.OUTPUT) else None,
            parent=fields.get(Field.PARENT) or None,
            children=(tuple(json.loads(fields[Field.CHILDREN])) if fields.get(Field.CHILDREN)
                      else ()),
        )


def finish_arguments(task_id: str, *, state: str, result: int, error: int, description: str,
                     finished: str, percent: int, retention: int, output: str = "",
                     judged: bool = False, grace: int = 0) -> dict[str, Any]:
    """The keyword arguments of `lua/task_finish.lua` for one task: a worker's end of
    its own task, or (``judged``) a crash judgment, which ends the task only if its
    lease expired and no new primary appeared within ``grace`` seconds."""
    return {
        "record": keys.task_record(task_id), "lease": keys.task_lease(task_id),
        "running": keys.RUNNING_TASKS, "channel": keys.task_channel(task_id),
        "primary": keys.REDIS_PRIMARY, "deadlines": keys.LEASE_DEADLINES,
        "state": state, "result": result, "error": error, "description": description,
        "finished": finished, "percent": percent, "retention": retention,
        "task_id": task_id, "only_if_lease_expired": "1" if judged else "0",
        "output": output, "grace": grace, "host_running_prefix": keys.HOST_RUNNING_PREFIX,
    }


def judge_arguments(task_id: str, retention_seconds: int,
                    grace_seconds: float) -> dict[str, Any]:
    """`lua/task_finish.lua`'s keyword arguments as a crash judgment of ``task_id``."""
    return finish_arguments(
        task_id, state=FAILURE, result=int(VMTaskResult.ThreadCrashError),
        error=hresults.SERVER_FAULT, description=CRASH_DESCRIPTION,
        finished=repr(time.time()), percent=0, retention=retention_seconds, judged=True,
        grace=max(1, math.ceil(grace_seconds)))


def judge_crashed(scripts: Scripts, task_id: str, retention_seconds: int,
                  grace_seconds: float) -> bool:
    """End a started task whose lease expired with ThreadCrashError; True if it did.

    Shared by producers and workers' reapers: the script re-checks the lease
    atomically.  ``grace_seconds`` (the lease) is how long after a new Redis primary
    appears no task is judged: leases could not be renewed while the primary was
    switching.
    """
    outcome = scripts.task_finish(**judge_arguments(task_id, retention_seconds, grace_seconds))
    if outcome == "OK":
        cascade_cancel(scripts, task_id, retention_seconds)
    return bool(outcome == "OK")


def children_of(raw: str | None) -> list[str]:
    """A composite task's children, from its record's ``children`` field."""
    return [str(child) for child in json.loads(raw)] if raw else []


def cascade_cancel(scripts: Scripts, task_id: str, retention_seconds: int) -> list[str]:
    """Cancel every child of a composite task that can still be cancelled
    (`workers.composite`): done by whoever judges the parent crashed, so that no child
    runs on with nobody to follow it.  A child past its point of no return (a live
    migration past its switch-over) refuses, and finishes by itself.  The children
    cancelled."""
    children = children_of(scripts.client.hget(keys.task_record(task_id), Field.CHILDREN))
    return [child for child in children
            if cancel_record(scripts, child, retention_seconds) in CANCELLED]


def cancel_arguments(task_id: str, retention_seconds: int, *,
                     revoke_queued: bool = False) -> dict[str, Any]:
    """`lua/task_cancel.lua`'s keyword arguments for ``task_id``."""
    return {"record": keys.task_record(task_id), "channel": keys.task_channel(task_id),
            "now": repr(time.time()), "retention": retention_seconds,
            "result": int(VMTaskResult.Cancelled), "error": hresults.E_ABORT,
            "revoke_queued": "1" if revoke_queued else "0", "task_id": task_id,
            "host_pending_prefix": keys.HOST_PENDING_PREFIX}


def cancel_record(scripts: Scripts, task_id: str, retention_seconds: int, *,
                  revoke_queued: bool = False) -> str:
    """The record's cancel transition; ``revoke_queued`` is Celery's revoke, which
    also drops a queued task whose operation is not cancelable (it never ran).

    Returns MISSING, COMPLETE, NOT_CANCELABLE, REVOKED (it was queued) or REQUESTED
    (it runs, and stops at its next check)."""
    return str(scripts.task_cancel(**cancel_arguments(task_id, retention_seconds,
                                                      revoke_queued=revoke_queued)))


def list_arguments(state: str | None, host: str | None, limit: int,
                   horizon: int) -> dict[str, Any]:
    """`lua/task_list.lua`'s keyword arguments (None: any state, any host)."""
    return {"recent": keys.RECENT_TASKS, "record_prefix": keys.task_record(""),
            "state": state or "", "host": host or "", "limit": limit, "horizon": horizon}


def matching_tasks(scripts: Scripts, state: str | None, host: str | None, limit: int,
                   horizon: int) -> list[str]:
    """Ids of the newest tasks in ``state`` on ``host`` (None: any), newest first,
    looking at most ``horizon`` tasks back: filtered by Redis, one round trip."""
    found = scripts.task_list(**list_arguments(state, host, limit, horizon))
    return [str(task_id) for task_id in found]


def trim_recent(client: redis.Redis, retention_seconds: float) -> None:
    """Bound the recent-task index by age and by count, like the records it names.

    The workers' heartbeat does this now and then, so a submit never pays for it."""
    pipe = client.pipeline(transaction=False)
    pipe.zremrangebyscore(keys.RECENT_TASKS, "-inf", time.time() - retention_seconds)
    pipe.zremrangebyrank(keys.RECENT_TASKS, 0, -MAX_RECENT_TASKS - 1)
    pipe.execute()
