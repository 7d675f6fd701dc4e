"""Producer-side argument checks: each raises `errors.InvalidArgumentError` before
anything is queued.  The worker checks again against the real storage root."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from api.errors import InvalidArgumentError
from api.protocol import formats, hresults

MiB = formats.MiB
MAX_PATH_BYTES = 4096
MAX_TEXT_BYTES = 4096
# Celery task ids are uuid4 strings; vmtask never makes another kind.
TASK_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
# A Redis stream id: "$" (from now), or "<ms>" / "<ms>-<seq>".
STREAM_ID_PATTERN = re.compile(r"\$|[0-9]{1,19}(-[0-9]{1,19})?")


def check_text(value: object, what: str, *, max_bytes: int = MAX_TEXT_BYTES,
               allow_empty: bool = False) -> str:
    """A str that UTF-8 can carry (no lone surrogates, no NUL), at most ``max_bytes``."""
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{what} must be a str, not {type(value).__name__}")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgumentError(f"{what} {value!r} is not valid Unicode text") from None
    if "\x00" in value:
        raise InvalidArgumentError(f"{what} {value!r} contains a NUL character")
    if not allow_empty and not value.strip():
        raise InvalidArgumentError(f"{what} must not be empty")
    if len(encoded) > max_bytes:
        raise InvalidArgumentError(f"{what} is longer than {max_bytes} bytes")
    return value


def check_relative_path(path: str, what: str = "path") -> str:
    """A relative path with no '..', inside the storage root.

    Leaving the root is one rule wherever it is caught: ACCESS_DENIED (0x80070005).
    Here, for '..' and absolute paths, an `InvalidArgumentError` carrying it; the
    worker, which re-resolves the path against the real root (symlinks and backing
    files included), ends the task DiskRelatedError with the same HRESULT.
    """
    check_text(path, what, max_bytes=MAX_PATH_BYTES)
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts:
        raise InvalidArgumentError(
            f"{what} {path!r} leads outside the storage root: give a path relative to it, "
            "without '..'", hresults.ACCESS_DENIED)
    return path


def check_task_id(task_id: object) -> str:
    if not isinstance(task_id, str) or not TASK_ID_PATTERN.fullmatch(task_id):
        raise InvalidArgumentError(f"task_id must be a task id (a uuid), not {task_id!r}")
    return task_id


def check_stream_id(value: object, what: str = "since") -> str:
    if not isinstance(value, str) or not STREAM_ID_PATTERN.fullmatch(value):
        raise InvalidArgumentError(
            f"{what} must be '$', '0' or a stream id such as '1700000000000-0', not {value!r}")
    return value


def format_for_name(path: str) -> str:
    try:
        return formats.format_for_name(path)
    except formats.FormatError as exc:
        raise InvalidArgumentError(str(exc)) from None


def check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgumentError(f"{name} must be an int in {low}..{high:,}, not {value!r}")
    return value


def disk_size_bytes(path: str, size_mb: int) -> int:
    """The size of a new disk at ``path``, checked against its format's maximum."""
    if isinstance(size_mb, bool) or not isinstance(size_mb, int) or size_mb <= 0:
        raise InvalidArgumentError(f"size_mb must be a positive int, not {size_mb!r}")
    check_relative_path(path)
    try:
        formats.check_maximum(format_for_name(path), size_mb * MiB)
    except formats.FormatError as exc:
        raise InvalidArgumentError(str(exc)) from None
    return size_mb * MiB
