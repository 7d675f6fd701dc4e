"""What a submit decides before and between its round trips, without I/O.

`ServerCore.submit` (sync) and `AsyncVirtualServer.submit` (asyncio) both record
and enqueue an operation the same way: the arguments checked against the
operation's `TaskSpec`, the record's fields (a composite task's child names its
parent), the host chosen, the queue, and the message kombu would send, built as
data (`api.publish`).  They differ only in how
the record and the message reach Redis.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from api.errors import BrokerUnavailableError, HostUnavailableError, InvalidArgumentError
from api.protocol import keys
from api.protocol.records import Field
from api.protocol.taskcalls import PublishCommand
from api.protocol.tasks import TaskSpec
from api.publish import message_commands
from api.settings import redact_url
from api.store import SEND_ERRORS, access_denied, refusal_of


@dataclass
class ParentLink:
    """A composite task's hold on what it submits (`workers.composite`): every task
    carries the parent's id (the record's ``parent``, Celery's ``parent_id`` and
    ``root_id``, so Flower shows the tree), and the children it follows are listed in
    the parent's record before they are queued (`ServerCore.announce_child`)."""

    parent_id: str
    root_id: str
    children: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Submission:
    task_name: str
    description: str
    cancelable: bool
    quick: bool
    task_id: str
    args: list[Any]
    kwargs: dict[str, Any] = field(default_factory=dict)
    parent_id: str | None = None
    root_id: str | None = None

    @property
    def record(self) -> dict[str, Any]:
        """`TaskStore.create`'s keyword arguments but the host and the message."""
        record: dict[str, Any] = {"name": self.task_name, "description": self.description,
                                  "cancelable": self.cancelable,
                                  "arguments": {"args": list(self.args), **self.kwargs}}
        if self.parent_id is not None and self.root_id is not None:
            record["extra"] = {Field.PARENT: self.parent_id, Field.ROOT: self.root_id}
        return record

    @property
    def tree(self) -> dict[str, str]:
        """Celery's ``parent_id`` and ``root_id`` of a composite task's child."""
        if self.parent_id is None or self.root_id is None:
            return {}
        return {"parent_id": self.parent_id, "root_id": self.root_id}

    def queue(self, host: str) -> str:
        return keys.control_queue(host) if self.quick else keys.host_queue(host)

    def message(self, celery: Celery, host: str, url: str) -> list[PublishCommand]:
        """The Redis commands of its Celery message to ``host`` (no round trip but
        kombu's first declaration of a queue)."""
        queue = self.queue(host)
        try:
            return message_commands(celery, self.task_name, args=list(self.args),
                                    kwargs=self.kwargs, task_id=self.task_id, queue=queue,
                                    routing_key=queue, **self.tree)
        except SEND_ERRORS as exc:
            refusal = refusal_of(exc)
            if refusal is not None:
                raise access_denied(url, refusal,
                                    f"Could not enqueue {self.task_name}: ") from None
            raise BrokerUnavailableError(
                f"Could not enqueue {self.task_name}: Redis at {redact_url(url)} "
                f"cannot be reached: {exc}") from None


def prepare(task: TaskSpec | str, *, description: str, cancelable: bool | None,
            kwargs: Mapping[str, Any] | None, args: Sequence[Any],
            task_id: str | None, link: ParentLink | None = None) -> Submission:
    """Check an operation's arguments against its spec (a bare task name needs
    ``cancelable``) and give it an id; under a composite task (``link``), the
    parent's."""
    arguments = dict(kwargs or {})
    quick = False
    if isinstance(task, TaskSpec):
        task.check_kwargs(arguments)
        task_name, cancelable, quick = task.name, task.cancelable, task.quick
    else:
        task_name = task
    if cancelable is None:
        raise TypeError(f"cancelable is required for the task {task_name!r}")
    return Submission(task_name, description, cancelable, quick,
                      task_id or str(uuid.uuid4()), list(args), arguments,
                      parent_id=None if link is None else link.parent_id,
                      root_id=None if link is None else link.root_id)


def host_not_live(wanted: str, live: Sequence[str]) -> HostUnavailableError:
    return HostUnavailableError(
        f"No live worker serves host {wanted!r} (live: {', '.join(live) or 'none'})")


def only_host(live: Sequence[str]) -> str:
    """The host an operation goes to when none is named: the only live one."""
    if len(live) == 1:
        return live[0]
    if not live:
        raise HostUnavailableError("No worker host is live; start one with 'vmtask worker'")
    raise InvalidArgumentError(
        f"Several hosts are live ({', '.join(live)}): pass host= or set VMTASK_HOST")
