"""The task log: the time-stamped lines a task's operation wrote, kept beside its record.

One Redis list per task (`keys.task_log`) of small JSON objects, written by
`lua/task_log.lua`: RPUSH, and LTRIM once the cap is passed, inside the scripts
that already move the record (start, finish, cancel, withdraw), so the start and
end lines cost no round trip of their own.  The record counts the entries the cap
dropped, so each entry has a number (1, 2, ... over the task's life) and a follower
asks for those after the last it printed (`lua/task_log_read.lua`), never skipping
or repeating one.  An entry is a line of text (``m``) or a transition's fields
(state, result, HRESULT) that the reader words, so Lua needs no table of names.

A list rather than a stream (XADD MAXLEN, whose ids would number the lines for
free): Redis 7 allocates a stream's first node whole (``stream-node-max-bytes``,
4 KiB), so the log of a task with two lines took 4.7 KB against 0.33 KB as a list,
kept for every task for the record's retention: ten times the record itself.

The log keeps the last `MAX_LINES` entries, each line clipped to `MAX_LINE_BYTES`
(UTF-8), and expires with the record (each write gives it the record's TTL).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from api.enums import VMTaskResult
from api.protocol import hresults

MAX_LINES = 1000  # `lua/task_log.lua` says the same; a unit test keeps them equal
MAX_LINE_BYTES = 1024
MSG_LOG = "log"  # published on the task's channel when a worker wrote lines

# Option values that may hold a secret, in the argument lists of qemu-img, qemu-nbd
# and QEMU (``--object secret,id=s0,data=...``, ``password=``, a key's contents);
# a path to a key or a credentials directory (``dir=``, ``file=``) is not one.
_SECRET_OPTION = re.compile(
    r"(?i)\b(data|password|passwd|passphrase|secret|key|psk|token)=([^,\s\"']*)")
_SECRET_JSON = re.compile(
    r"(?i)(\"(?:password|passwd|passphrase|secret|key|psk|token|data)\"\s*:\s*)\"[^\"]*\"")
# The password of a URL: ``redis://user:password@host``.
_URL_PASSWORD = re.compile(r"([a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]+@", re.IGNORECASE)
REDACTED = "<redacted>"


def redact(text: str) -> str:
    """``text`` with the values of secret-looking options replaced by `REDACTED`."""
    # ``password=on`` (QEMU's VNC: a password will be set) names no secret.
    text = _SECRET_OPTION.sub(
        lambda m: m.group(0) if m.group(2) in ("", "on", "off") else f"{m.group(1)}={REDACTED}",
        text)
    text = _SECRET_JSON.sub(lambda m: f"{m.group(1)}\"{REDACTED}\"", text)
    return _URL_PASSWORD.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)


def clip(text: str) -> str:
    """One line of at most `MAX_LINE_BYTES` bytes of UTF-8: newlines become spaces."""
    line = " ".join(text.splitlines())
    encoded = line.encode("utf-8")
    if len(encoded) <= MAX_LINE_BYTES:
        return line
    return encoded[:MAX_LINE_BYTES - 3].decode("utf-8", errors="ignore") + "..."


def format_time(seconds: float) -> str:
    """``2026-12-07T20:33:01.123Z``: UTC, to the millisecond."""
    stamp = datetime.fromtimestamp(seconds, UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def _result_name(value: Any) -> str:
    try:
        return VMTaskResult(int(value)).name
    except ValueError:
        return str(value)


def describe(fields: Mapping[str, Any]) -> str:
    """The text of one entry, without its time."""
    kind = fields.get("kind")
    if kind is None:
        return str(fields.get("m", ""))
    if kind == "start":
        return f"started on worker {fields.get('worker', '?')}"
    if kind == "cancel":
        return "cancel requested"
    if kind == "end":
        state, result = fields.get("state", "?"), fields.get("result", "")
        if state == "SUCCESS":
            return "ended: Success"
        error = hresults.format_hresult(int(fields.get("error") or 0))
        what = "crashed (its worker's lease expired)" if fields.get("judged") == "1" else "ended"
        text = str(fields.get("text", ""))
        return f"{what}: {_result_name(result)} {error}" + (f": {text}" if text else "")
    return f"{kind} " + " ".join(f"{k}={v}" for k, v in fields.items()
                                 if k not in ("n", "t", "kind"))


def decode(raw: str) -> dict[str, Any]:
    """One stored entry: its fields (strings)."""
    fields: dict[str, Any] = json.loads(raw)
    return fields


def format_entry(fields: Mapping[str, Any]) -> str:
    """``<UTC time> <text>``: one line of `VMTask.log`."""
    try:
        when = format_time(float(fields.get("t", "0")))
    except ValueError:
        when = "?"
    return f"{when} {describe(fields)}"
