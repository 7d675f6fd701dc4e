"""The host's files as operations see them: paths resolved inside the storage
root, backing chains, file locks, and the description `HardDisk` shows.

Each operation makes one `HostFiles` from its run's settings; paths travel as
strings relative to the root and become filesystem paths only through it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from api.protocol import hresults
from api.settings import Settings
from workers.engines import qemu_img
from workers.engines.storage import free_space, resolve_in_root
from workers.failures import DiskError, IllegalValue

LOCK_DIRECTORY = ".vmtask-locks"


@dataclass(frozen=True)
class HostFiles:
    settings: Settings
    root: Path
    """The storage root's real path."""

    @classmethod
    def of(cls, settings: Settings) -> HostFiles:
        settings.storage_root.mkdir(parents=True, exist_ok=True)
        return cls(settings, settings.storage_root.resolve())

    def resolve(self, path: str, *, must_exist: bool = False) -> Path:
        return resolve_in_root(self.root, path, must_exist=must_exist)

    def resolve_output(self, path: str) -> Path:
        """An output path; its directories are created (they are inside the root)."""
        target = resolve_in_root(self.root, path)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def relative(self, path: Path | str | None) -> str | None:
        """A worker path as the producer names it: relative to the root when inside it."""
        if path is None:
            return None
        real = Path(os.path.realpath(path))
        return str(real.relative_to(self.root)) if real.is_relative_to(self.root) else str(path)

    def chain_infos(self, path: Path) -> list[qemu_img.DiskInfo]:
        """``qemu-img info`` of the image and of each parent (backing file), nearest first."""
        chain = [qemu_img.info(path)]
        while (parent := chain[-1].parent) is not None:
            if len(chain) > 64:
                raise IllegalValue(f"The backing chain of {self.relative(path)} is too deep")
            chain.append(qemu_img.info(Path(parent)))
        return chain

    def chain_of(self, path: Path) -> list[Path]:
        """The image and its parents (backing files), nearest first."""
        return [Path(info.file) for info in self.chain_infos(path)]

    @contextmanager
    def file_locks(self, reads: Sequence[Path], writes: Sequence[Path]) -> Iterator[None]:
        """Shared locks on ``reads``, exclusive on ``writes``; refuse at once on conflict."""
        lock_dir = self.root / LOCK_DIRECTORY
        lock_dir.mkdir(exist_ok=True)
        wanted: dict[Path, int] = {p: fcntl.LOCK_SH for p in reads}
        wanted.update({p: fcntl.LOCK_EX for p in writes})
        with ExitStack() as stack:
            for path in sorted(wanted):  # one order for every task: no lock-order deadlock
                name = hashlib.sha256(str(path).encode()).hexdigest()[:32]
                fd = os.open(lock_dir / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                stack.callback(os.close, fd)
                try:
                    fcntl.flock(fd, wanted[path] | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise DiskError(
                        f"{self.relative(path)} is in use by another task",
                        hresults.SHARING_VIOLATION,
                    ) from None
            yield

    def describe(self, path: Path, known: qemu_img.DiskInfo | None = None) -> dict[str, Any]:
        """What `HardDisk` shows: the image, then its parents, paths relative to the root.

        ``known`` is the image's info when the engine just produced it (and it has no
        parent), which saves reading it again.
        """
        infos = [known] if known is not None and known.parent is None else self.chain_infos(path)
        chain: list[dict[str, Any]] = []
        for info in infos:
            chain.append({
                "file": self.relative(info.file),
                "type": int(info.disk_type),
                "format": info.format,
                "size_in_guest": info.virtual_size,
                "size_on_host": info.actual_size,
                "host_drive": info.host_drive,
                "read_only": info.read_only,
            })
        return {"chain": chain, "host_free_disk_space": free_space(self.root)}

    def allowed_host_drive(self, device: str) -> Path:
        """A host drive must be named by the host's allow-list (exact, or under a prefix/)."""
        for entry in self.settings.host_drive_allow:
            if device == entry or (entry.endswith("/") and device.startswith(entry)):
                real = Path(os.path.realpath(device))
                if str(real) == entry or (entry.endswith("/") and str(real).startswith(entry)):
                    return real
                break
        raise DiskError(
            f"Host drive {device!r} is not allowed on host {self.settings.host} "
            "(see VMTASK_HOST_DRIVE_ALLOW)", hresults.ACCESS_DENIED
        )
