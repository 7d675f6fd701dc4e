"""A tiny but real Linux guest: Debian's cloud kernel, busybox and the real qemu-ga.

The VM engine and its tests need a guest that boots in seconds under TCG, answers
the QEMU guest agent and honours the ACPI power button, without a disk image or a
network download beyond the Debian mirror.  `build_tiny_guest` assembles one from
three Debian packages (the kernel that ``linux-image-cloud-amd64`` points at,
``busybox-static`` and ``qemu-guest-agent``) and caches the result, keyed by their
versions and by the recipe below, so it is rebuilt only when one of them changes.

The packages are fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x``,
never installed: no agent service lands on the host.  qemu-ga's shared libraries
(found with ``ldd``) and the loader are copied from the host; they are all
dependencies of ``qemu-system-x86`` too, which `scripts/bootstrap.sh` installs.

What the guest does (busybox init is PID 1; see `INIT_SCRIPT` and `INITTAB`):

* mounts /proc, /sys, /dev and /run; loads the virtio-pci, virtio-console,
  virtio-net, virtio-blk, ACPI button and evdev modules, which the cloud kernel
  ships as modules, and prints its CPU count;
* brings each NIC up and asks for an address by DHCP (busybox ``udhcpc``, in the
  background), and serves a marker page on TCP port 80 (busybox ``httpd``);
* arms a power-button watcher that asks init for an orderly ``poweroff``, and only
  then prints `READY_MARKER` on the serial console, so a ``system_powerdown`` sent
  after the marker is never lost;
* runs Debian's ``qemu-ga -m virtio-serial -p /dev/virtio-ports/<AGENT_PORT_NAME>``,
  respawned by init, with an ``/etc/os-release`` for ``guest-get-osinfo``;
* has a ``/sbin/shutdown`` (the program qemu-ga runs for ``guest-shutdown``) that,
  like systemd's, only asks init to go down and returns at once; init then runs its
  shutdown action (`GOING_DOWN_S` seconds during which the agent still answers, as
  on a real OS), signals every process and powers off, halts or reboots.

A variant with ``shutdown_fails=True`` has a ``/sbin/shutdown`` that fails, so the
real agent answers ``guest-shutdown`` with its error reply (a guest that refuses);
``blocked_commands`` starts qemu-ga with them blocked (``-b``), as an administrator
may (a guest whose boot id cannot be read, like a non-Linux one).
Nothing imitates the agent any more: every fault the tests need is one the real
qemu-ga produces (see tests/integration/test_tinyguest.py).
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
AGENT_PACKAGE = "qemu-guest-agent"
AGENT_BINARY = "usr/sbin/qemu-ga"
# The roots of the module closure; their dependencies are added from the modules
# themselves.
GUEST_MODULES = ("virtio_pci", "virtio_console", "virtio_net", "virtio_blk", "button",
                 "evdev")
DEFAULT_APPEND = "console=ttyS0 quiet panic=-1"
# How long the guest's shutdown action lasts: the window in which a going-down
# guest's agent still answers.
GOING_DOWN_S = 3

# Bump when the image layout changes in a way the scripts' text does not show.
_RECIPE_REVISION = "2"
_APT_TIMEOUT = 600.0
_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")

# The boot script, run by busybox init as its sysinit, respawn and shutdown actions,
# with @MODULES@, @PORT@, @MARKER@ and @GOING_DOWN_S@ filled in by `render_init_script`.
INIT_SCRIPT = resources.files(__package__).joinpath("tinyguest_init.sh").read_text("utf-8")
BOOT_SCRIPT_PATH = "etc/vmtask/boot.sh"

INITTAB = """\
::sysinit:/etc/vmtask/boot.sh sysinit
::respawn:/etc/vmtask/boot.sh agent
::shutdown:/etc/vmtask/boot.sh shutdown
"""

# What qemu-ga runs for guest-shutdown: ``shutdown -h -P|-H|-r +0 <message>``.  Like
# systemd's shutdown it only asks init (busybox poweroff/halt/reboot without -f
# signal PID 1) and returns at once, while the guest goes down behind it.
SHUTDOWN_SCRIPT = """\
#!/bin/sh
action=poweroff
for arg in "$@"; do
    case $arg in
        -P) action=poweroff ;;
        -H) action=halt ;;
        -r) action=reboot ;;
    esac
done
echo "vmtask-guest: shutdown $* -> $action" > /dev/console
exec "$action"
"""

# The variant whose shutdown fails: qemu-ga then replies with its error.
FAILING_SHUTDOWN_SCRIPT = """\
#!/bin/sh
echo "vmtask-guest: shutdown $* refused" > /dev/console
exit 1
"""

OS_RELEASE = """\
PRETTY_NAME="vmtask tiny guest (busybox)"
NAME="vmtask tiny guest"
ID=vmtask-tinyguest
VERSION_ID=1
"""


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


@dataclass(frozen=True)
class _Packages:
    kernel: _Package
    busybox: _Package
    agent: _Package


def default_cache_dir() -> Path:
    configured = os.environ.get("VMTASK_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "vmtask" / "tinyguest"


def render_init_script(modules: Iterable[str], blocked_commands: Iterable[str] = ()) -> str:
    blocked = ",".join(blocked_commands)
    if not re.fullmatch(r"[a-z0-9,-]*", blocked):
        raise ValueError(f"not agent command names: {blocked!r}")
    return (
        INIT_SCRIPT.replace("@MODULES@", " ".join(modules))
        .replace("@AGENT_ARGS@", f"-b {blocked}" if blocked else "")
        .replace("@PORT@", AGENT_PORT_NAME)
        .replace("@MARKER@", READY_MARKER)
        .replace("@GOING_DOWN_S@", str(GOING_DOWN_S))
    )


def build_tiny_guest(
    cache_dir: Path | None = None,
    *,
    shutdown_fails: bool = False,
    blocked_commands: tuple[str, ...] = (),
) -> TinyGuest:
    """Return the cached tiny guest, building it first if the packages changed.

    With `shutdown_fails` the guest's ``/sbin/shutdown`` fails, so its (real) agent
    refuses ``guest-shutdown`` with an error reply; `blocked_commands` are refused by
    qemu-ga as disabled.

    Safe to call from many processes at once: one builds under a lock while the
    others wait, and a build becomes visible only by an atomic rename.
    """
    cache = (cache_dir if cache_dir is not None else default_cache_dir()).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    recipe = _recipe_digest(shutdown_fails, blocked_commands)
    try:
        packages = _resolve_packages()
    except TinyGuestError:
        # Offline or without apt lists: an earlier build of the same recipe is
        # still a correct guest, only perhaps not the newest kernel.
        fallback = _newest_build(cache, recipe)
        if fallback is None:
            raise
        return _guest_at(fallback)
    final = cache / _cache_key(packages, recipe)
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
            _build(staging, packages, shutdown_fails, blocked_commands)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return _guest_at(final)


def _guest_at(directory: Path) -> TinyGuest:
    return TinyGuest(
        kernel=directory / "vmlinuz", initrd=directory / "initrd.img", append=DEFAULT_APPEND
    )


def _recipe_digest(shutdown_fails: bool, blocked_commands: tuple[str, ...]) -> str:
    shutdown = FAILING_SHUTDOWN_SCRIPT if shutdown_fails else SHUTDOWN_SCRIPT
    text = "\n".join([_RECIPE_REVISION, render_init_script(GUEST_MODULES, blocked_commands),
                      INITTAB, shutdown, OS_RELEASE, *GUEST_MODULES])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _cache_key(packages: _Packages, recipe: str) -> str:
    raw = (f"{packages.kernel.name}_{packages.kernel.version}"
           f"+busybox_{packages.busybox.version}+qga_{packages.agent.version}+r{recipe}")
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


def _lookup_packages() -> _Packages:
    shown = _apt_show(KERNEL_METAPACKAGE, BUSYBOX_PACKAGE, AGENT_PACKAGE)
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
    return _Packages(
        kernel=image,
        busybox=_Package(BUSYBOX_PACKAGE, shown[BUSYBOX_PACKAGE]["Version"]),
        agent=_Package(AGENT_PACKAGE, shown[AGENT_PACKAGE]["Version"]),
    )


def _resolve_packages() -> _Packages:
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


def _build(
    staging: Path, packages: _Packages, shutdown_fails: bool, blocked_commands: tuple[str, ...]
) -> None:
    work = staging / "work"
    work.mkdir()
    kernel_pkg, busybox_pkg, agent_pkg = packages.kernel, packages.busybox, packages.agent
    debs = _download([kernel_pkg, busybox_pkg, agent_pkg], work)
    roots = {}
    for package in (kernel_pkg, busybox_pkg, agent_pkg):
        roots[package.name] = work / package.name
        _run(["dpkg-deb", "-x", str(debs[package.name]), str(roots[package.name])])

    module_dir = _module_dir(roots[kernel_pkg.name])
    release = module_dir.name
    vmlinuz = roots[kernel_pkg.name] / "boot" / f"vmlinuz-{release}"
    if not vmlinuz.is_file():
        raise TinyGuestError(f"{kernel_pkg.name} ships no {vmlinuz.name}")
    busybox = roots[busybox_pkg.name] / "bin" / "busybox"
    if not busybox.is_file():
        raise TinyGuestError(f"{busybox_pkg.name} ships no bin/busybox")
    agent = roots[agent_pkg.name] / AGENT_BINARY
    if not agent.is_file():
        raise TinyGuestError(f"{agent_pkg.name} ships no {AGENT_BINARY}")
    libraries = _shared_libraries(agent)

    modules = _module_closure(_module_index(module_dir), GUEST_MODULES)
    archive = _Cpio()
    directories = {"bin", "dev", "etc", "etc/vmtask", "lib", "lib/modules", "proc", "run",
                   "sbin", "sys", "tmp", "usr", "usr/bin", "usr/sbin", "var"}
    for library in libraries:
        parent = Path(library.lstrip("/")).parent
        directories.update(str(p) for p in [parent, *parent.parents] if str(p) != ".")
    for directory in sorted(directories):
        archive.directory(directory)
    # The kernel opens the console before init runs, so it must exist before devtmpfs.
    archive.char_device("dev/console", 0o600, 5, 1)
    archive.file("bin/busybox", busybox.read_bytes(), 0o755)
    archive.symlink("bin/sh", "busybox")
    # The kernel runs /init; busybox, called by that name, is init.
    archive.symlink("init", "bin/busybox")
    archive.file("etc/inittab", INITTAB.encode(), 0o644)
    archive.file(BOOT_SCRIPT_PATH,
                 render_init_script([n for n, _ in modules], blocked_commands).encode(), 0o755)
    shutdown = FAILING_SHUTDOWN_SCRIPT if shutdown_fails else SHUTDOWN_SCRIPT
    archive.file("sbin/shutdown", shutdown.encode(), 0o755)
    archive.file("etc/os-release", OS_RELEASE.encode(), 0o644)
    # qemu-ga keeps its state in /var/run.
    archive.symlink("var/run", "../run")
    archive.file(AGENT_BINARY, agent.read_bytes(), 0o755)
    for library, source in libraries.items():
        # The real file under the name the loader looks for (ldd's path is often a
        # symlink to a versioned file).
        archive.file(library.lstrip("/"), source.read_bytes(), 0o755)
    for name, path in modules:
        archive.file(f"lib/modules/{name}.ko", _read_module(path), 0o644)
    names = [name for name, _ in modules]
    manifest = {
        "kernel_package": [kernel_pkg.name, kernel_pkg.version],
        "busybox_package": [busybox_pkg.name, busybox_pkg.version],
        "agent_package": [agent_pkg.name, agent_pkg.version],
        "agent_libraries": sorted(libraries),
        "shutdown_fails": shutdown_fails,
        "blocked_commands": list(blocked_commands),
        "kernel_release": release,
        "modules": names,
        "append": DEFAULT_APPEND,
    }
    archive.file("etc/vmtask-tinyguest.json", json.dumps(manifest).encode(), 0o644)

    shutil.copyfile(vmlinuz, staging / "vmlinuz")
    (staging / "initrd.img").write_bytes(gzip.compress(archive.finish(), mtime=0))
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(work)


_LDD_LINE = re.compile(r"^\s*(?:\S+\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)\s*$")


def _shared_libraries(binary: Path) -> dict[str, Path]:
    """The libraries `binary` loads, and its loader: each path it is looked up by,
    mapped to the real file behind it on this host."""
    found: dict[str, Path] = {}
    for line in _run(["ldd", str(binary)]).splitlines():
        if "not found" in line:
            raise TinyGuestError(f"{binary.name} needs a library this host lacks: {line.strip()}"
                                 " (install qemu-system-x86, which depends on the same ones)")
        match = _LDD_LINE.match(line)
        if match:
            found[match[1]] = Path(match[1]).resolve(strict=True)
    if not any("/ld-linux" in name for name in found):
        raise TinyGuestError(f"ldd named no loader for {binary}")
    return found


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
