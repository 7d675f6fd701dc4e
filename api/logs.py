"""Following a task's log live (`vmtask task log -f`), from any process.

The follower is woken by the task's channel, as `VMTask.wait_for_completion` is:
a worker that writes lines publishes ``log`` there, the end of the task publishes
``done``, so a line is printed when it is written, not at the next poll.  It
subscribes before its first read, so nothing written in between is missed, and
re-reads every ``poll_interval`` anyway in case a message is lost.  Lines are read
by number ("after the last one printed"), so none is skipped or repeated, even
when the log's cap drops old ones meanwhile.  It ends once the record is complete:
the end line is written by the same script that completes the record.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from api.errors import BrokerAccessDeniedError, BrokerUnavailableError
from api.protocol import keys, tasklog
from api.store import TaskStore
from api.task import VMTask
from api.waiter import RETRYABLE_WAIT_ERRORS

# A follower rides out a Redis restart this long before giving up.
BROKER_GRACE_SECONDS = 30.0


def follow_log(task: VMTask, *, tail: int | None = None,
               poll_interval: float = 1.0) -> Iterator[str]:
    """The task's log lines (the last ``tail`` first, if given), then each new line as
    it is written, until the task is complete.  `TaskNotFoundError` for an unknown
    task; `BrokerUnavailableError` once Redis has been away `BROKER_GRACE_SECONDS`."""
    store: TaskStore = task._store  # the handle's own store
    channel = keys.task_channel(task.id)
    last = 0
    lost_at: float | None = None
    first = True
    while True:
        try:
            pubsub = store.subscription()
            pubsub.subscribe(channel)
            try:
                # Subscribed before reading: a line or the end published after the
                # read below wakes us.
                _wait_message(pubsub, channel, time.monotonic() + poll_interval,
                              subscribe=True)
                if first:
                    number, entries = store.log_entries(task.id, tail=tail)
                    last, first = number - 1 + len(entries), False
                    for fields in entries:
                        yield tasklog.format_entry(fields)
                while True:
                    # The state first: once it reads complete, the read of the lines
                    # after it holds the end line too.
                    complete = task.snapshot().is_complete
                    number, entries = store.log_entries(task.id, after=last)
                    last = number - 1 + len(entries)
                    for fields in entries:
                        yield tasklog.format_entry(fields)
                    lost_at = None
                    if complete:
                        return
                    _wait_message(pubsub, channel, time.monotonic() + poll_interval)
            finally:
                store.release_subscription(channel)
        except BrokerAccessDeniedError:
            store.drop_subscription()
            raise
        except RETRYABLE_WAIT_ERRORS as exc:
            store.drop_subscription()
            now = time.monotonic()
            lost_at = lost_at or now
            if now - lost_at > BROKER_GRACE_SECONDS:
                raise BrokerUnavailableError(
                    f"Redis was unreachable for {BROKER_GRACE_SECONDS:g} s while following "
                    f"the log of task {task.id}: {exc}") from None
            time.sleep(0.5)


def _wait_message(pubsub: Any, channel: str, deadline: float, *,
                  subscribe: bool = False) -> None:
    """Until a message on ``channel`` (its subscribe confirmation, with ``subscribe``)
    or ``deadline``; replies of earlier waits on this connection are skipped."""
    wanted = "subscribe" if subscribe else "message"
    while (left := deadline - time.monotonic()) > 0:
        message = pubsub.get_message(timeout=left)
        if message is not None and message.get("channel") == channel \
                and message.get("type") == wanted:
            return
