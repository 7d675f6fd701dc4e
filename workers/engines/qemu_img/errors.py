"""What a failure means: qemu-img's stderr and OSErrors mapped onto vmtask failures.

`failure_from_stderr` classifies an error text by tables of English message
fragments (qemu-img runs with ``LC_ALL=C`` for that reason); `disk_error` maps an
OSError from the engine's own file work by its errno.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from api.protocol import hresults
from workers.failures import (
    ERRNO_TO_HRESULT,
    CorruptImage,
    DiskError,
    IllegalValue,
    OperationFailed,
)

_DISK_FULL = ("no space left on device", "disk quota exceeded")
_IO_ERROR = ("input/output error",)
_ACCESS = (
    "permission denied",
    "operation not permitted",
    "read-only file system",
    "block node is read-only",
)
# qemu's image locking: a running VM (or another qemu-img) has the image open.
_IN_USE = ("is another process using the image", "failed to get")
_NOT_FOUND = ("no such file or directory", "no such device")
_EXISTS = ("file exists",)
_TOO_LARGE = (
    "image size is too large",
    "image size too large",
    "invalid image size",
    "file too large",
)
# Signs of a damaged image that win over the errno text that follows them: qemu 7.2
# reports bad qcow2 metadata as "Image is corrupt: ..." and then "Input/output error".
_CORRUPT = (
    "corrupt",
    "image is not in",
    "invalid vpc image",
    "header too short",
    "invalid footer",
    "invalid header",
    "bad magic",
    "unsupported qcow version",
    "unsupported qcow2 version",
    "not a vhdx",
    "invalid l1",
    "invalid backing file",
    "exceeds the maximum",
)
# Weaker signs, only trusted when no errno text explains the failure better.
_PROBABLY_CORRUPT = ("invalid argument", "could not read")


_QUOTED = re.compile(r"'[^']*'")


def failure_from_stderr(
    stderr: str, action: str = "qemu-img", paths: Sequence[str] = ()
) -> OperationFailed:
    """The failure that a qemu-img error text means.

    File names are blanked out before matching (quoted ones, and ``paths``), so a
    disk called ``corrupt.qcow2`` that is merely missing is not reported as corrupt.
    """
    text = stderr.strip()
    matchable = text
    for path in sorted(paths, key=len, reverse=True):
        matchable = matchable.replace(path, " ")
    lowered = _QUOTED.sub(" ", matchable).lower()
    description = f"{action} failed: {text}" if text else f"{action} failed"

    def has(words: Sequence[str]) -> bool:
        return any(word in lowered for word in words)

    if has(_DISK_FULL):
        return DiskError(description, hresults.DISK_FULL)
    if has(_CORRUPT):
        return CorruptImage(description)
    if has(_IO_ERROR):
        return DiskError(description, hresults.WRITE_FAULT)
    if has(_IN_USE):
        return DiskError(description, hresults.SHARING_VIOLATION)
    if has(_ACCESS):
        return DiskError(description, hresults.ACCESS_DENIED)
    if has(_NOT_FOUND):
        return DiskError(description, hresults.FILE_NOT_FOUND)
    if has(_EXISTS):
        return DiskError(description, hresults.FILE_EXISTS)
    if has(_TOO_LARGE):
        return IllegalValue(description)
    if has(_PROBABLY_CORRUPT):
        return CorruptImage(description)
    return OperationFailed(description)


def clean_stderr(raw: bytes | bytearray) -> str:
    text = raw.decode(errors="replace")
    return "\n".join(line.removeprefix("qemu-img: ") for line in text.strip().splitlines())


def disk_error(exc: OSError, what: str) -> DiskError:
    code = ERRNO_TO_HRESULT.get(exc.errno or 0, hresults.WRITE_FAULT)
    return DiskError(f"{what}: {exc.strerror or exc}", code)
