"""Opening a file beneath the storage root by file descriptor.

`resolve_in_root` checks a path by name; between that check and an ``open`` a
directory or the file itself could be swapped for a symlink that leads out.
`open_beneath` closes that window: it opens the checked, symlink-free path relative
to a descriptor of the root and refuses any symlink met on the way, with
``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`` where the kernel has it (5.6+),
else by walking the components with ``O_NOFOLLOW`` one ``openat`` at a time.

qemu is then handed ``/proc/self/fd/N`` (`proc_path`): the kernel reopens exactly
the inode the worker opened, whatever the names in the root have become since.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from api.protocol import hresults
from workers.failures import DiskError

_SYS_OPENAT2 = 437  # the same number on every architecture we run on
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
# ELOOP: a symlink where none may be; EXDEV: a step out of the root; EAGAIN: the
# kernel saw a concurrent rename and refuses to guess.
_ESCAPE_ERRNOS = (errno.ELOOP, errno.EXDEV, errno.EAGAIN)


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


_openat2_missing = False


def _openat2(dir_fd: int, relative: str, flags: int) -> int | None:
    """The descriptor, or None when this kernel (or a seccomp filter) lacks openat2."""
    global _openat2_missing
    if _openat2_missing:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        _openat2_missing = True
        return None
    how = _OpenHow(
        flags=flags,
        mode=0,
        resolve=_RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS,
    )
    fd = int(libc.syscall(
        ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dir_fd), ctypes.c_char_p(os.fsencode(relative)),
        ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)),
    ))
    if fd >= 0:
        return fd
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EPERM):
        _openat2_missing = True
        return None
    raise OSError(code, os.strerror(code), relative)


def _walk(dir_fd: int, parts: tuple[str, ...], flags: int) -> int:
    """openat one component at a time, never following a symlink."""
    current = os.dup(dir_fd)
    try:
        for part in parts[:-1]:
            step = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                           dir_fd=current)
            os.close(current)
            current = step
        return os.open(parts[-1], flags | os.O_NOFOLLOW, dir_fd=current)
    finally:
        os.close(current)


def open_beneath(root: Path, real: Path, flags: int = os.O_RDONLY) -> int:
    """Open ``real``, a symlink-free path inside the real path ``root``, by descriptor.

    A symlink anywhere on the way (one swapped in after the path was checked) or a
    path outside the root is `DiskError` ACCESS_DENIED; a missing file FILE_NOT_FOUND.
    """
    try:
        relative = Path(real).relative_to(root)
    except ValueError:
        raise DiskError(f"{real} is outside the storage root", hresults.ACCESS_DENIED) from None
    if not relative.parts or ".." in relative.parts:
        raise DiskError(f"{real} is not a file inside the storage root", hresults.ACCESS_DENIED)
    flags |= os.O_CLOEXEC | os.O_NOCTTY
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = _openat2(root_fd, str(relative), flags)
        if fd is None:
            fd = _walk(root_fd, relative.parts, flags)
    except OSError as exc:
        if exc.errno in _ESCAPE_ERRNOS or (exc.errno == errno.ENOTDIR and len(relative.parts) > 1):
            raise DiskError(
                f"{relative} changed into a symlink while it was opened", hresults.ACCESS_DENIED
            ) from exc
        if exc.errno == errno.ENOENT:
            raise DiskError(f"{relative} does not exist", hresults.FILE_NOT_FOUND) from exc
        raise
    finally:
        os.close(root_fd)
    return fd


def proc_path(fd: int) -> str:
    """The name under which a child (given ``fd`` in pass_fds) reopens that very file."""
    return f"/proc/self/fd/{fd}"
