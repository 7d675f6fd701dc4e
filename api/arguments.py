"""Producer-side argument checks: each raises `errors.InvalidArgumentError` before
anything is queued.  The worker checks again against the real storage root."""

from __future__ import annotations

from pathlib import PurePosixPath

from api.errors import InvalidArgumentError
from api.protocol import formats

MiB = formats.MiB


def check_relative_path(path: str, what: str = "path") -> str:
    """A relative path with no '..', inside the storage root.

    The worker re-resolves it against the real root, symlinks included.
    """
    if not isinstance(path, str) or not path.strip() or "\x00" in path:
        raise InvalidArgumentError(f"{what} must be a non-empty path, not {path!r}")
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts:
        raise InvalidArgumentError(
            f"{what} {path!r} must be relative to the storage root, without '..'"
        )
    return path


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
