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
from typing import TYPE_CHECKING, Any

from api.enums import VMHardDiskType
from api.protocol import hresults
from workers.engines import qemu_img
from workers.engines.beneath import open_beneath, proc_path
from workers.engines.qemu_img.info import has_protocol
from workers.engines.qemu_img.pinned import PinnedChain, PinnedImage, device_spec
from workers.engines.storage import free_space, resolve_in_root
from workers.failures import DiskError, IllegalValue

if TYPE_CHECKING:  # the settings module loads redis; a HostFiles only reads its fields
    from api.settings import Settings

LOCK_DIRECTORY = ".vmtask-locks"
MAX_CHAIN = 64


@dataclass(frozen=True)
class ChainLink:
    real: Path
    """The image's real path inside the root."""
    info: qemu_img.DiskInfo
    fd: int
    pinned: PinnedImage
    extra_fds: tuple[int, ...] = ()
    """Descriptors of its data file or host-drive backing, when in the root."""


@dataclass(frozen=True)
class Chain:
    """An image and its parents, nearest first, each open by descriptor."""

    links: tuple[ChainLink, ...]
    tail: dict[str, Any] | None
    """A read-only host drive's device under the last image."""

    @property
    def reals(self) -> list[Path]:
        return [link.real for link in self.links]

    def pinned(self) -> PinnedChain:
        """What qemu gets: every image by descriptor, the chain's end explicit."""
        fds = [fd for link in self.links for fd in (link.fd, *link.extra_fds)]
        return PinnedChain(tuple(link.pinned for link in self.links), tuple(fds), self.tail)


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

    def open_file(self, path: str, stack: ExitStack) -> int:
        """A producer's plain file (a kernel, an initrd), open by descriptor beneath the
        root; it closes with ``stack``."""
        fd = open_beneath(self.root, self.resolve(path, must_exist=True))
        stack.callback(os.close, fd)
        return fd

    def open_chain(self, path: Path, stack: ExitStack) -> Chain:
        """Open the image at ``path`` and every parent, each confined to the root.

        Each image is opened by descriptor beneath the root before ``qemu-img info``
        reads it (through that descriptor), so what is checked is what qemu gets.
        A qcow2's external data file is read from its header and confined before
        qemu-img runs at all.  A backing or data file whose name (absolute, relative,
        through symlinks, ``json:`` or another protocol) leads outside the root is
        `DiskError` ACCESS_DENIED, unless it is an allow-listed host drive.  The
        descriptors close with ``stack``.
        """
        links: list[ChainLink] = []
        real = self.resolve(str(path))
        while True:
            if len(links) > MAX_CHAIN:
                raise IllegalValue(f"The backing chain of {self.relative(path)} is too deep")
            if real in (link.real for link in links):
                raise DiskError(f"The backing chain of {self.relative(path)} loops",
                                hresults.DISK_CORRUPT)
            fd = open_beneath(self.root, real)
            stack.callback(os.close, fd)
            fmt = qemu_img.format_for(real)
            data_file, data_fds = self._data_file(real, fmt, fd, stack)
            head = PinnedImage(fmt, proc_path(fd), data_file)
            info = qemu_img.info(real, opened=PinnedChain((head,), (fd, *data_fds)))
            tail, tail_fds, parent = self._confine(real, info, data_file is not None, stack)
            links.append(ChainLink(real, info, fd, head, (*data_fds, *tail_fds)))
            if parent is None:
                return Chain(tuple(links), tail)
            real = parent

    def _data_file(self, image: Path, fmt: str, fd: int, stack: ExitStack
                   ) -> tuple[dict[str, Any] | None, tuple[int, ...]]:
        """The blockdev spec of a qcow2's external data file, from its header: an
        allow-listed host drive or a file in the root opened beneath it (its fd)."""
        if fmt != "qcow2":
            return None, ()
        name = qemu_img.qcow2_data_file(fd)
        if name is None:
            return None, ()
        if has_protocol(name):
            raise DiskError(f"The data file of {self.relative(image)} is not a file in the "
                            f"storage root ({name[:200]!r})", hresults.ACCESS_DENIED)
        device, fds = self.host_drive_of(os.path.normpath(os.path.join(image.parent, name)),
                                         stack)
        return device_spec(device, read_only=False), fds

    def _confine(self, image: Path, info: qemu_img.DiskInfo, pinned_data: bool,
                 stack: ExitStack) -> tuple[dict[str, Any] | None, tuple[int, ...], Path | None]:
        """Check where ``info`` points: (its host-drive backing spec and descriptors,
        its parent's real path inside the root)."""
        name = self.relative(image)
        if info.disk_type is VMHardDiskType.HostDrive and info.host_drive is not None:
            if not info.read_only:
                if not pinned_data:  # the header changed between two reads of one inode
                    raise DiskError(f"The data file of {name} changed while it was checked",
                                    hresults.ACCESS_DENIED)
                return None, (), None
            device, fds = self.host_drive_of(info.host_drive, stack)
            return device_spec(device, read_only=True), fds, None
        backing = info.backing_name
        if backing is None or info.parent is None:
            return None, (), None
        if has_protocol(backing):
            raise DiskError(f"The backing file of {name} is not a file in the storage root "
                            f"({backing[:200]!r})", hresults.ACCESS_DENIED)
        try:
            parent = self.resolve(info.parent)
        except IllegalValue:
            raise DiskError(f"The backing file of {name} is not an image in the storage root",
                            hresults.ACCESS_DENIED) from None
        return None, (), parent

    def host_drive_of(self, device: str, stack: ExitStack) -> tuple[str, tuple[int, ...]]:
        """A host-drive image's device or data file: allow-listed, or a file in the root
        (then named by a descriptor opened beneath the root, which the child needs)."""
        try:
            inside = self.resolve(device)
        except (DiskError, IllegalValue):
            return str(self.allowed_host_drive(device)), ()
        fd = open_beneath(self.root, inside)
        stack.callback(os.close, fd)
        return proc_path(fd), (fd,)

    def chain_infos(self, path: Path) -> list[qemu_img.DiskInfo]:
        """``qemu-img info`` of the image and of each parent (backing file), nearest first."""
        with ExitStack() as stack:
            return [link.info for link in self.open_chain(path, stack).links]

    def chain_of(self, path: Path) -> list[Path]:
        """The image and its parents (backing files), real paths inside the root."""
        with ExitStack() as stack:
            return [link.real for link in self.open_chain(path, stack).links]

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
