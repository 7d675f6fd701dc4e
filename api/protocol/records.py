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
from api.protocol import scripts

PENDING = "PENDING"
STARTED = "STARTED"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
REVOKED = "REVOKED"
COMPLETE_STATES = frozenset({SUCCESS, FAILURE, REVOKED})
# What the start gate answers the one delivery that may run the task.
BEGUN = "BEGUN"

# Messages on a task's channel.
MSG_PROGRESS = "progress"
MSG_CANCEL = "cancel"
MSG_DONE = "done"

START_SCRIPT = scripts.load("task_start")

PROGRESS_SCRIPT = scripts.load("task_progress")
RENEW_SCRIPT = scripts.load("task_renew")

FINISH_SCRIPT = scripts.load("task_finish")

CANCEL_SCRIPT = scripts.load("task_cancel")
SUBMIT_SCRIPT = scripts.load("task_submit")
READ_SCRIPT = scripts.load("task_read")
WITHDRAW_SCRIPT = scripts.load("task_withdraw")
LIST_SCRIPT = scripts.load("task_list")


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
            parent=fields.get("parent") or None,
            children=tuple(json.loads(fields["children"])) if fields.get("children") else (),
        )
