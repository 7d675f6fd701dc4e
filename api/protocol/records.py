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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from api.enums import VMTaskResult
from api.protocol import hresults

PENDING = "PENDING"
STARTED = "STARTED"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
REVOKED = "REVOKED"
COMPLETE_STATES = frozenset({SUCCESS, FAILURE, REVOKED})

# Messages on a task's channel.
MSG_PROGRESS = "progress"
MSG_CANCEL = "cancel"
MSG_DONE = "done"

# KEYS: record, lease, running set. ARGV: now, worker name, lease ms, task id.
START_SCRIPT = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'PENDING' then return state or 'MISSING' end
redis.call('HSET', KEYS[1], 'state', 'STARTED', 'started', ARGV[1], 'worker', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'runs', 1)
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', KEYS[3], ARGV[4])
return 'STARTED'
"""

# KEYS: record, channel. ARGV: percent. Only ever raises the percentage.
PROGRESS_SCRIPT = """
if redis.call('HGET', KEYS[1], 'state') ~= 'STARTED' then return 0 end
local current = tonumber(redis.call('HGET', KEYS[1], 'percent') or '0')
local new = tonumber(ARGV[1])
if new <= current then return 0 end
redis.call('HSET', KEYS[1], 'percent', ARGV[1])
redis.call('PUBLISH', KEYS[2], 'progress')
return 1
"""

# KEYS: record, lease, running set, channel.
# ARGV: state, result, error, error description, finished time, percent,
#       retention seconds, task id, only_if_lease_expired ('1' or '0'), output JSON.
FINISH_SCRIPT = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'STARTED' then
  redis.call('SREM', KEYS[3], ARGV[8])
  return state or 'MISSING'
end
if ARGV[9] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then return 'LEASED' end
local percent = tonumber(redis.call('HGET', KEYS[1], 'percent') or '0')
if tonumber(ARGV[6]) > percent then percent = tonumber(ARGV[6]) end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'result', ARGV[2], 'error', ARGV[3],
           'error_description', ARGV[4], 'finished', ARGV[5], 'percent', percent,
           'output', ARGV[10])
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[8])
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('PUBLISH', KEYS[4], 'done')
return 'OK'
"""

# KEYS: record, channel. ARGV: finished time, retention seconds.
# %-formatting because Lua's braces would need escaping with str.format().
CANCEL_SCRIPT = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'MISSING' end
if state ~= 'PENDING' and state ~= 'STARTED' then return 'COMPLETE' end
if redis.call('HGET', KEYS[1], 'cancelable') ~= '1' then return 'NOT_CANCELABLE' end
redis.call('HSET', KEYS[1], 'cancel_requested', '1')
if state == 'PENDING' then
  redis.call('HSET', KEYS[1], 'state', 'REVOKED', 'result', '%(cancelled)d',
             'error', '%(e_abort)d', 'error_description', 'Cancelled before it started',
             'finished', ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  redis.call('PUBLISH', KEYS[2], 'done')
  return 'REVOKED'
end
redis.call('PUBLISH', KEYS[2], 'cancel')
return 'REQUESTED'
""" % {"cancelled": VMTaskResult.Cancelled, "e_abort": hresults.E_ABORT}  # noqa: UP031


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

    @property
    def is_complete(self) -> bool:
        return self.state in COMPLETE_STATES

    @property
    def is_crashed_candidate(self) -> bool:
        """Started, yet no live worker holds its lease."""
        return self.state == STARTED and not self.lease_alive

    @classmethod
    def from_record(cls, task_id: str, fields: dict[str, str], lease_alive: bool) -> TaskSnapshot:
        state = fields.get("state", PENDING)
        complete = state in COMPLETE_STATES
        result = fields.get("result")

        def maybe_float(name: str) -> float | None:
            value = fields.get(name)
            return float(value) if value else None

        return cls(
            id=task_id,
            name=fields.get("name", ""),
            description=fields.get("description", ""),
            host=fields.get("host", ""),
            state=state,
            percent_completed=int(float(fields.get("percent", "0"))),
            is_cancelable=fields.get("cancelable") == "1" and not complete,
            result=VMTaskResult(int(result)) if complete and result not in (None, "") else None,
            error=int(fields.get("error") or 0),
            error_description=fields.get("error_description", ""),
            created=float(fields.get("created") or 0.0),
            started=maybe_float("started"),
            finished=maybe_float("finished"),
            cancel_requested=fields.get("cancel_requested") == "1",
            lease_alive=lease_alive,
            output=json.loads(fields["output"]) if fields.get("output") else None,
        )
