"""The host's storage root: confining producer paths, temporary names, atomic publishing.

Every path a producer gives is relative to ``VMTASK_STORAGE_ROOT``.  `resolve_in_root`
is the only way such a path becomes a filesystem path, so ``..``, absolute paths and
symlinks cannot make an operation read or write outside the root.

Outputs are written under a hidden temporary name beside their target
(`temporary_path_for`) and moved into place by `publish_atomically`, which never
replaces a file that appeared meanwhile.  A worker that restarts after a crash calls
`remove_stale_temporaries` to delete what its dead tasks left behind.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

from api.protocol import hresults
from workers.failures import DiskError, IllegalValue

TEMP_SUFFIX = ".tmp"
_TEMP_MARKER = ".vmtask-"
# Celery task ids are uuid4 strings; anything wider could smuggle a separator or a
# newline into a file name.
_TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TEMP_NAME = re.compile(r"^\..*\.vmtask-(?P<task_id>[A-Za-z0-9_-]{1,64})\.tmp$", re.DOTALL)
_NAME_MAX = 255

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def resolve_in_root(root: Path, relative: str, *, must_exist: bool = False) -> Path:
    """Return the real path that ``relative`` names inside ``root``.

    Symlinks are followed wherever they are (parent directories and the last
    component, dangling or not) and the result must still lie inside the root's real
    path; otherwise `DiskError` ACCESS_DENIED.  An empty or malformed path, or one
    naming the root itself, is `IllegalValue`.  Nothing is created.
    """
    if not isinstance(relative, str) or not relative.strip():
        raise IllegalValue("A path inside the storage root is required")
    if "\x00" in relative:
        raise IllegalValue(f"The path {relative!r} contains a NUL character")
    try:
        real_root = Path(root).resolve(strict=True)
    except OSError as exc:
        raise DiskError(f"The storage root {root} does not exist", hresults.FILE_NOT_FOUND) from exc
    if not real_root.is_dir():
        raise DiskError(f"The storage root {root} is not a directory", hresults.FILE_NOT_FOUND)

    # os.path.realpath walks the components in order, so a ".." that follows a
    # symlink climbs from the link's target, exactly as the kernel would.
    candidate = Path(relative) if os.path.isabs(relative) else real_root / relative
    try:
        real = Path(os.path.realpath(candidate))
    except OSError as exc:  # e.g. a symlink loop on some Python versions
        raise DiskError(f"Cannot resolve {relative!r}: {exc}", hresults.ACCESS_DENIED) from exc
    if not real.is_relative_to(real_root):
        raise DiskError(
            f"The path {relative!r} leads outside the storage root", hresults.ACCESS_DENIED
        )
    if real == real_root:
        raise IllegalValue(f"The path {relative!r} names the storage root itself")
    if must_exist and not os.path.lexists(real):
        raise DiskError(f"{relative} does not exist", hresults.FILE_NOT_FOUND)
    return real


def temporary_path_for(target: Path, task_id: str) -> Path:
    """The hidden name beside ``target`` under which task ``task_id`` builds it.

    ``.<name>.vmtask-<task_id>.tmp``: hidden, in the same directory (so the final
    rename stays on one filesystem), and recognisable by `remove_stale_temporaries`.
    """
    if not _TASK_ID.fullmatch(task_id):
        raise IllegalValue(f"Unusable task id {task_id!r} for a temporary file name")
    name = target.name
    tail = f"{_TEMP_MARKER}{task_id}{TEMP_SUFFIX}"
    if len(os.fsencode(f".{name}{tail}")) > _NAME_MAX:
        # Keep the name legal on filesystems with a 255-byte limit; the digest keeps
        # two long targets in one directory from sharing a temporary name.
        digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
        name = f"{name[:80]}~{digest}"
    return target.with_name(f".{name}{tail}")


def task_id_of_temporary(path: Path) -> str | None:
    """The task id encoded in a temporary name, or None when it is not one of ours."""
    match = _TEMP_NAME.match(path.name)
    return match.group("task_id") if match else None


def _renameat2_noreplace(source: Path, target: Path) -> bool:
    """Rename without replacing; False when the kernel or filesystem lacks the flag."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    renameat2.restype = ctypes.c_int
    result = renameat2(
        _AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE
    )
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(target))


def publish_atomically(temp: Path, target: Path) -> None:
    """Move ``temp`` to ``target`` in one step, never overwriting an existing target.

    Raises `DiskError` FILE_EXISTS when ``target`` appeared meanwhile; ``temp`` is then
    left for the caller to remove.
    """
    try:
        if _renameat2_noreplace(temp, target):
            return
        # Hard links give the same no-replace guarantee on kernels or filesystems
        # without RENAME_NOREPLACE; the brief window with two names is harmless
        # because the temporary name is recognisable and removed below or at restart.
        os.link(temp, target)
    except FileExistsError as exc:
        raise DiskError(f"{target} already exists", hresults.FILE_EXISTS) from exc
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise DiskError(f"{target} already exists", hresults.FILE_EXISTS) from exc
        raise
    os.unlink(temp)


def remove_quietly(path: Path) -> None:
    """Delete ``path`` if present; used in cleanup paths that must not raise."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        pass


def remove_stale_temporaries(
    root: Path, live_task_ids: Callable[[str], bool] | None = None
) -> list[Path]:
    """Delete the temporary files that dead tasks left anywhere under ``root``.

    ``live_task_ids(task_id)`` says whether a task is still running (its temporary is
    then kept); without it every temporary is considered stale, which is right for a
    worker that is starting up and runs nothing yet.  Symlinks are neither followed
    nor deleted through: a temporary-looking symlink is itself removed.  Returns the
    removed paths.
    """
    removed: list[Path] = []
    real_root = Path(root).resolve()
    for directory, dirnames, filenames in os.walk(real_root, followlinks=False):
        # os.walk lists symlinks to directories among dirnames; those are entries too.
        for name in [*filenames, *dirnames]:
            match = _TEMP_NAME.match(name)
            if match is None:
                continue
            path = Path(directory, name)
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(mode):
                continue
            if live_task_ids is not None and live_task_ids(match.group("task_id")):
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            removed.append(path)
    return removed


def free_space(path: Path) -> int:
    """Bytes available to unprivileged writers on the filesystem holding ``path``.

    ``path`` need not exist yet: its nearest existing ancestor is measured.
    """
    probe = Path(path)
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    result = os.statvfs(probe)
    return result.f_bavail * result.f_frsize


def fsync_directory(directory: Path, *, strict: bool = False) -> None:
    """Make a rename in ``directory`` durable.

    Best effort unless ``strict``: some filesystems refuse a directory fsync, and
    the rename itself has already happened.  A saved VM state is strict, since a
    state whose rename may not survive a power cut must not be trusted.
    """
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        if strict:
            raise
        return
    try:
        os.fsync(fd)
    except OSError:
        if strict:
            raise
    finally:
        os.close(fd)
