"""A tiny but real Linux guest: Debian's cloud kernel and a busybox initramfs.

The VM engine and its tests need a guest that boots in seconds under TCG, answers
the QEMU guest agent and honours the ACPI power button, without a disk image or a
network download beyond the Debian mirror.  `build_tiny_guest` assembles one from
two Debian packages (the kernel that ``linux-image-cloud-amd64`` points at, and
``busybox-static``) and caches the result, keyed by their versions and by the
recipe below, so it is rebuilt only when one of them changes.

What the guest does (see `INIT_SCRIPT`):

* loads the virtio-pci, virtio-console, virtio-net, virtio-blk, ACPI button and evdev
  modules, which the cloud kernel ships as modules, and prints its CPU count;
* brings each NIC up and asks for an address by DHCP (busybox ``udhcpc``, in the
  background), and serves a marker page on TCP port 80 (busybox ``httpd``);
* arms a power-button watcher that runs ``poweroff -f``, and only then prints
  `READY_MARKER` on the serial console, so a ``system_powerdown`` sent after the
  marker is never lost;
* serves a small subset of the QEMU guest agent protocol on the virtio-serial port
  named `AGENT_PORT_NAME`: ``guest-sync``, ``guest-sync-delimited``,
  ``guest-ping``, ``guest-info``, ``guest-shutdown``, ``guest-get-osinfo``,
  ``guest-network-get-interfaces``, and ``guest-file-open``/``-read``/``-write``/
  ``-close`` on whole files: a read returns all of it (the kernel's boot id), a
  write replaces the first bytes in place and syncs (a pattern on a virtio disk).
  The agent is line based: every command must end with a newline, which
  `workers.engines.guest_agent` always sends.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from workers.engines.guest_agent import AGENT_PORT_NAME
from workers.failures import OperationFailed

READY_MARKER = "VMTASK-GUEST-READY"
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
# The roots of the module closure; their dependencies are added from the modules
# themselves.
GUEST_MODULES = ("virtio_pci", "virtio_console", "virtio_net", "virtio_blk", "button",
                 "evdev")
DEFAULT_APPEND = "console=ttyS0 quiet panic=-1"

# Bump when the image layout changes in a way the init script's text does not show.
_RECIPE_REVISION = "1"
_APT_TIMEOUT = 600.0
_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")

# PID 1 of the guest.  Sourced with a PID other than 1 (host-side tests), it only
# defines the functions.  The agent never echoes client text into a reply, so no
# JSON escaping is needed.
# The guest's /init (busybox sh), with @MODULES@, @PORT@, @READY@ and @COMMANDS@ filled
# in by `render_init_script`.  It answers a minimal guest agent.
INIT_SCRIPT = resources.files(__package__).joinpath("tinyguest_init.sh").read_text("utf-8")

AGENT_COMMANDS = (
    "guest-sync",
    "guest-sync-delimited",
    "guest-ping",
    "guest-info",
    "guest-shutdown",
    "guest-get-osinfo",
    "guest-network-get-interfaces",
    "guest-file-open",
    "guest-file-read",
    "guest-file-write",
    "guest-file-close",
)


class TinyGuestError(OperationFailed):
    """The tiny guest could not be built."""


@dataclass(frozen=True)
class TinyGuest:
    kernel: Path
    initrd: Path
    append: str


@dataclass(frozen=True)
class _Package:
    name: str
    version: str


def default_cache_dir() -> Path:
    configured = os.environ.get("VMTASK_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "vmtask" / "tinyguest"


def render_init_script(modules: Iterable[str]) -> str:
    commands = ", ".join(
        json.dumps({"enabled": True, "name": name, "success-response": name != "guest-shutdown"})
        for name in AGENT_COMMANDS
    )
    return (
        INIT_SCRIPT.replace("@MODULES@", " ".join(modules))
        .replace("@PORT@", AGENT_PORT_NAME)
        .replace("@MARKER@", READY_MARKER)
        .replace("@COMMANDS@", commands)
    )


def build_tiny_guest(cache_dir: Path | None = None) -> TinyGuest:
    """Return the cached tiny guest, building it first if the packages changed.

    Safe to call from many processes at once: one builds under a lock while the
    others wait, and a build becomes visible only by an atomic rename.
    """
    cache = (cache_dir if cache_dir is not None else default_cache_dir()).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    recipe = _recipe_digest()
    try:
        kernel_pkg, busybox_pkg = _resolve_packages()
    except TinyGuestError:
        # Offline or without apt lists: an earlier build of the same recipe is
        # still a correct guest, only perhaps not the newest kernel.
        fallback = _newest_build(cache, recipe)
        if fallback is None:
            raise
        return _guest_at(fallback)
    final = cache / _cache_key(kernel_pkg, busybox_pkg, recipe)
    if final.is_dir():
        return _guest_at(final)
    with _locked(cache / f".{final.name}.lock"):
        if final.is_dir():
            return _guest_at(final)
        # Builders only work while holding the lock, so leftovers are from dead ones.
        for stale in cache.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache))
        # mkdtemp is private; the finished guest is readable by every user of the cache.
        staging.chmod(0o755)
        try:
            _build(staging, kernel_pkg, busybox_pkg)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return _guest_at(final)


def _guest_at(directory: Path) -> TinyGuest:
    return TinyGuest(
        kernel=directory / "vmlinuz", initrd=directory / "initrd.img", append=DEFAULT_APPEND
    )


def _recipe_digest() -> str:
    text = "\n".join([_RECIPE_REVISION, INIT_SCRIPT, *GUEST_MODULES, *AGENT_COMMANDS])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _cache_key(kernel: _Package, busybox: _Package, recipe: str) -> str:
    raw = f"{kernel.name}_{kernel.version}+busybox_{busybox.version}+r{recipe}"
    return re.sub(r"[^A-Za-z0-9._+-]", "_", raw)


def _newest_build(cache: Path, recipe: str) -> Path | None:
    builds = [d for d in cache.glob(f"*+r{recipe}") if d.is_dir() and not d.name.startswith(".")]
    return max(builds, key=lambda d: d.stat().st_mtime, default=None)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# ---------------------------------------------------------------- apt


def _run(args: list[str], cwd: Path | None = None) -> str:
    env = dict(os.environ, LC_ALL="C")
    try:
        done = subprocess.run(
            args,
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=_APT_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TinyGuestError(f"{args[0]} failed: {exc}") from exc
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip()
        raise TinyGuestError(f"{' '.join(args)} exited with {done.returncode}: {detail}")
    return done.stdout


def _apt_stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in block.splitlines():
            if line[:1].isspace() and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields:
            stanzas.append(fields)
    return stanzas


def _apt_show(*names: str) -> dict[str, dict[str, str]]:
    text = _run(["apt-cache", "show", "--no-all-versions", *names])
    found = {s["Package"]: s for s in _apt_stanzas(text) if "Package" in s}
    missing = [n for n in names if n not in found or "Version" not in found[n]]
    if missing:
        raise TinyGuestError(f"apt-cache does not know {', '.join(missing)}")
    return found


_DEPENDENCY = re.compile(r"^\s*([a-z0-9][a-z0-9.+-]*)(?::\S+)?\s*(?:\(\s*=\s*([^)\s]+)\s*\))?")


def _lookup_packages() -> tuple[_Package, _Package]:
    shown = _apt_show(KERNEL_METAPACKAGE, BUSYBOX_PACKAGE)
    image: _Package | None = None
    for alternatives in shown[KERNEL_METAPACKAGE].get("Depends", "").split(","):
        for alternative in alternatives.split("|"):
            match = _DEPENDENCY.match(alternative)
            if match and match[1].startswith("linux-image-") and match[1] != KERNEL_METAPACKAGE:
                image = _Package(match[1], match[2] or "")
                break
        if image:
            break
    if image is None:
        raise TinyGuestError(f"{KERNEL_METAPACKAGE} depends on no linux-image package")
    if not image.version:
        image = _Package(image.name, _apt_show(image.name)[image.name]["Version"])
    return image, _Package(BUSYBOX_PACKAGE, shown[BUSYBOX_PACKAGE]["Version"])


def _resolve_packages() -> tuple[_Package, _Package]:
    try:
        return _lookup_packages()
    except TinyGuestError:
        pass
    # Only now: an update needs root and the mirror, and usually isn't needed.
    _run(["apt-get", "update"])
    return _lookup_packages()


def _download(packages: Iterable[_Package], directory: Path) -> dict[str, Path]:
    args = ["apt-get", "download"]
    if os.geteuid() == 0:
        # The _apt sandbox user cannot write into a private temp dir.
        args += ["-o", "APT::Sandbox::User=root"]
    wanted = list(packages)
    _run([*args, *(f"{p.name}={p.version}" for p in wanted)], cwd=directory)
    debs: dict[str, Path] = {}
    for package in wanted:
        matches = sorted(directory.glob(f"{package.name}_*.deb"))
        if len(matches) != 1:
            raise TinyGuestError(f"apt-get download left no single .deb for {package.name}")
        debs[package.name] = matches[0]
    return debs


# ---------------------------------------------------------------- build


def _build(staging: Path, kernel_pkg: _Package, busybox_pkg: _Package) -> None:
    work = staging / "work"
    work.mkdir()
    debs = _download([kernel_pkg, busybox_pkg], work)
    kernel_root = work / "kernel"
    busybox_root = work / "busybox"
    _run(["dpkg-deb", "-x", str(debs[kernel_pkg.name]), str(kernel_root)])
    _run(["dpkg-deb", "-x", str(debs[busybox_pkg.name]), str(busybox_root)])

    module_dir = _module_dir(kernel_root)
    release = module_dir.name
    vmlinuz = kernel_root / "boot" / f"vmlinuz-{release}"
    if not vmlinuz.is_file():
        raise TinyGuestError(f"{kernel_pkg.name} ships no {vmlinuz.name}")
    busybox = busybox_root / "bin" / "busybox"
    if not busybox.is_file():
        raise TinyGuestError(f"{busybox_pkg.name} ships no bin/busybox")

    modules = _module_closure(_module_index(module_dir), GUEST_MODULES)
    archive = _Cpio()
    for directory in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "tmp"):
        archive.directory(directory)
    # The kernel opens the console before init runs, so it must exist before devtmpfs.
    archive.char_device("dev/console", 0o600, 5, 1)
    archive.file("bin/busybox", busybox.read_bytes(), 0o755)
    archive.symlink("bin/sh", "busybox")
    for name, path in modules:
        archive.file(f"lib/modules/{name}.ko", _read_module(path), 0o644)
    names = [name for name, _ in modules]
    archive.file("init", render_init_script(names).encode(), 0o755)
    manifest = {
        "kernel_package": [kernel_pkg.name, kernel_pkg.version],
        "busybox_package": [busybox_pkg.name, busybox_pkg.version],
        "kernel_release": release,
        "modules": names,
        "append": DEFAULT_APPEND,
    }
    archive.file("etc/vmtask-tinyguest.json", json.dumps(manifest).encode(), 0o644)

    shutil.copyfile(vmlinuz, staging / "vmlinuz")
    (staging / "initrd.img").write_bytes(gzip.compress(archive.finish(), mtime=0))
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(work)


def _module_dir(root: Path) -> Path:
    for base in (root / "lib" / "modules", root / "usr" / "lib" / "modules"):
        if base.is_dir():
            releases = [d for d in base.iterdir() if (d / "kernel").is_dir()]
            if len(releases) == 1:
                return releases[0]
    raise TinyGuestError("the kernel package has no single lib/modules/<release>/kernel")


def _module_name(filename: str) -> str | None:
    for suffix in _MODULE_SUFFIXES:
        if filename.endswith(suffix):
            return filename[: -len(suffix)].replace("-", "_")
    return None


def _module_index(module_dir: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for path in (module_dir / "kernel").rglob("*.ko*"):
        name = _module_name(path.name)
        if name is not None:
            index[name] = path
    return index


def _module_closure(index: dict[str, Path], roots: Iterable[str]) -> list[tuple[str, Path]]:
    """The modules and their dependencies, each after everything it depends on.

    Debian's package ships no modules.dep (depmod writes it on install), so the
    dependencies come from each module's own ``.modinfo`` ``depends=`` field,
    which is what depmod reads too.
    """
    ordered: list[tuple[str, Path]] = []
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            raise TinyGuestError(f"module dependency cycle through {name}")
        path = index.get(name)
        if path is None:
            raise TinyGuestError(f"the kernel package has no module {name}")
        visiting.add(name)
        for dependency in _modinfo(_read_module(path)).get("depends", []):
            for dep in dependency.split(","):
                if dep:
                    visit(dep.replace("-", "_"))
        visiting.discard(name)
        done.add(name)
        ordered.append((name, path))

    for root in roots:
        visit(root)
    return ordered


def _read_module(path: Path) -> bytes:
    """The module's ELF bytes: busybox insmod loads only uncompressed modules."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        # The standard library has no zstd before Python 3.14.
        zstd = shutil.which("zstd")
        if zstd is None:
            raise TinyGuestError(f"{path.name} is zstd-compressed and zstd is not installed")
        try:
            done = subprocess.run(
                [zstd, "-dcq", str(path)], capture_output=True, check=True, timeout=60
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise TinyGuestError(f"cannot decompress {path.name}: {exc}") from exc
        return done.stdout
    return data


def _modinfo(elf: bytes) -> dict[str, list[str]]:
    """The ``key=value`` strings of a 64-bit little-endian module's .modinfo."""
    if elf[:4] != b"\x7fELF" or elf[4:6] != b"\x02\x01":
        raise TinyGuestError("not a 64-bit little-endian ELF module")
    (section_table,) = struct.unpack_from("<Q", elf, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", elf, 0x3A)
    sections: list[tuple[int, int, int]] = []
    for i in range(count):
        base = section_table + i * entry_size
        (name_offset,) = struct.unpack_from("<I", elf, base)
        offset, size = struct.unpack_from("<QQ", elf, base + 0x18)
        sections.append((name_offset, offset, size))
    _, names_offset, _ = sections[names_index]
    info: dict[str, list[str]] = {}
    for name_offset, offset, size in sections:
        start = names_offset + name_offset
        if elf[start : elf.index(b"\0", start)] != b".modinfo":
            continue
        for entry in elf[offset : offset + size].split(b"\0"):
            key, sep, value = entry.decode(errors="replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
    return info


class _Cpio:
    """A newc ("070701") archive, the format the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._inode = 0

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, 0o040000 | mode, b"", nlink=2)

    def file(self, name: str, data: bytes, mode: int) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def char_device(self, name: str, mode: int, major: int, minor: int) -> None:
        self._entry(name, 0o020000 | mode, b"", rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"", inode=0, nlink=1)
        return b"".join(self._chunks)

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes,
        nlink: int = 1,
        rdev: tuple[int, int] = (0, 0),
        inode: int | None = None,
    ) -> None:
        if inode is None:
            self._inode += 1
            inode = self._inode
        encoded = name.encode() + b"\0"
        fields = (inode, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self._chunks.append(header + encoded)
        self._chunks.append(b"\0" * (-(len(header) + len(encoded)) % 4))
        self._chunks.append(data)
        self._chunks.append(b"\0" * (-len(data) % 4))


def tiny_guest_boot_args(guest: TinyGuest) -> list[str]:
    """The QEMU arguments that boot `guest` directly, without firmware disk boot."""
    return ["-kernel", str(guest.kernel), "-initrd", str(guest.initrd), "-append", guest.append]
