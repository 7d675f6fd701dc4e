"""A Docker engine of the test's own, and stand-ins for the images no registry gives us.

`DockerEngine` starts Debian's ``dockerd`` with its own socket, data root,
exec root and pidfile, and stops it by its PID.  It runs with
``--iptables=false`` and no default bridge: a default ``dockerd`` sets the
iptables FORWARD policy to DROP, which (with ``br_netfilter``) breaks the
network-namespace tests that run beside this one.  Builds use the host's
network instead (no NAT is needed); containers talk to each other on the
compose network and to the host through the published ports (docker-proxy).

Without Docker's NAT its embedded DNS takes about 20 s to fail a name it cannot
resolve (a stopped service), long enough to freeze Sentinel and a replica:
`NxdomainResolver` answers every query "no such name" at once, and the test
gives it to the services with ``dns:``.

No image registry is reachable from our machines, so the images compose names
are built here: a Debian bookworm from ``debootstrap --variant=minbase``
(imported), then a Python and a Redis stand-in from it (`build_standins`).
The debootstrap tarball and the engine's data root (with its build cache) are
kept in `CACHE_DIR` between runs, under a lock; from an empty cache everything
is built again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from workers.devtools.sandbox import wait_until

CACHE_DIR = Path(os.environ.get("VMTASK_DEPLOYMENT_CACHE", "/var/cache/vmtask-deployment-test"))
DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
STANDINS = Path(__file__).parent / "standins"
BASE_IMAGE = "vmtask-standin/bookworm:minbase"
PYTHON_IMAGE = "vmtask-standin/python:bookworm"
REDIS_IMAGE = "vmtask-standin/redis:bookworm"
# Debian's engine and Compose v1: what our machines can install.
DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"
DOCKER_COMPOSE = "/usr/bin/docker-compose"


def run(argv: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 600,
        cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), env=dict(env) if env is not None else None, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}:\n"
                             f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


def install_missing_tools() -> None:
    """docker.io, docker-compose and debootstrap from Debian, when missing."""
    wanted = {"docker.io": DOCKERD, "docker-compose": DOCKER_COMPOSE,
              "debootstrap": "/usr/sbin/debootstrap"}
    missing = [package for package, path in wanted.items() if not Path(path).exists()]
    if missing:
        run(["apt-get", "update", "-qq"], timeout=600)
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, timeout=1200)


@contextlib.contextmanager
def cache_lock() -> Iterator[None]:
    """One engine at a time on the cached data root (another test run waits)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with (CACHE_DIR / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class DockerEngine:
    """``dockerd`` on its own socket and data root, stopped by PID."""

    def __init__(self, data_root: Path) -> None:
        self.data_root = data_root
        # Short: containerd's socket paths live under the exec root.
        self.exec_root = Path(tempfile.mkdtemp(prefix="vmtdk-", dir="/run"))
        self.socket = self.exec_root / "docker.sock"
        self.pidfile = self.exec_root / "docker.pid"
        self.log_path = data_root.parent / "dockerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.resolver_address = ""

    @property
    def env(self) -> dict[str, str]:
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(self.exec_root),
                "DOCKER_HOST": f"unix://{self.socket}", "COMPOSE_INTERACTIVE_NO_CLI": "1"}

    def start(self) -> DockerEngine:
        self.data_root.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [DOCKERD, "--host", f"unix://{self.socket}", "--data-root", str(self.data_root),
                 "--exec-root", str(self.exec_root), "--pidfile", str(self.pidfile),
                 "--iptables=false", "--ip-masq=false", "--bridge=none",
                 "--storage-driver=overlay2"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def answers() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"dockerd exited:\n{self.log()}")
            return run([DOCKER, "version"], env=self.env, timeout=30,
                       check=False).returncode == 0

        wait_until(answers, 120, "dockerd to answer", interval=0.5)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def docker(self, *args: str, timeout: float = 600, check: bool = True,
               ) -> subprocess.CompletedProcess[str]:
        return run([DOCKER, *args], env=self.env, timeout=timeout, check=check)

    def has_image(self, name: str) -> bool:
        return self.docker("image", "inspect", name, check=False).returncode == 0

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # dockerd stops its containers first
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        # dockerd leaves its default network namespace bind-mounted (netns/default).
        for mount in sorted(mounts_under(self.exec_root), reverse=True):
            run(["umount", "--lazy", mount], check=False)
        shutil.rmtree(self.exec_root, ignore_errors=True)


def mounts_under(directory: Path) -> list[str]:
    prefix = f"{directory}/"
    points = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    return [point for point in points if point.startswith(prefix)]


# -- the stand-in images ----------------------------------------------------------------


def debian_mirror() -> str:
    """The first URI of the machine's Debian sources (its apt mirror)."""
    for line in DEBIAN_SOURCES.read_text().splitlines():
        if line.startswith("URIs:"):
            return line.split()[1]
    return "http://deb.debian.org/debian"


def bookworm_tarball() -> Path:
    tarball = CACHE_DIR / "bookworm-minbase.tar.gz"
    if tarball.exists():
        return tarball
    root = Path(tempfile.mkdtemp(prefix="bookworm-", dir=CACHE_DIR))
    try:
        run(["debootstrap", "--variant=minbase", "bookworm", str(root), debian_mirror()],
            timeout=1200)
        partial = tarball.with_suffix(".partial")
        with partial.open("wb") as out:
            tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
            assert tar.stdout is not None
            subprocess.run(["gzip", "-1"], stdin=tar.stdout, stdout=out, check=True)
            assert tar.wait() == 0
        partial.rename(tarball)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return tarball


def build_standins(engine: DockerEngine) -> None:
    """The base, Python and Redis stand-ins (Docker's cache makes a rebuild quick)."""
    if not engine.has_image(BASE_IMAGE):
        engine.docker("import", str(bookworm_tarball()), BASE_IMAGE, timeout=600)
    with tempfile.TemporaryDirectory(prefix="standins-") as scratch:
        for name, image in (("python", PYTHON_IMAGE), ("redis", REDIS_IMAGE)):
            context = Path(scratch) / name
            shutil.copytree(STANDINS / name, context)
            if name == "python":
                # The machine's CA bundle (public certificates, no secret): PyPI is
                # reached through a TLS-intercepting proxy whose CA is in it.
                shutil.copy(CA_BUNDLE, context / "ca-bundle.crt")
            engine.docker("build", "--network", "host", "--build-arg", f"BASE={BASE_IMAGE}",
                          "-t", image, str(context), timeout=1200)


# -- a resolver that says "no such name" at once ----------------------------------------


class NxdomainResolver:
    """UDP port 53 on one address: every query gets NXDOMAIN back, at once."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, 53))
        self.sock.settimeout(0.5)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)

    def start(self) -> NxdomainResolver:
        self.thread.start()
        return self

    def serve(self) -> None:
        while not self.stopping.is_set():
            try:
                query, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            if len(query) < 12:
                continue
            ident, flags = struct.unpack("!HH", query[:4])
            question = first_question(query)
            # QR=1, the query's opcode and RD, RA=1, RCODE=3 (NXDOMAIN); the question back.
            reply_flags = 0x8000 | (flags & 0x7900) | 0x0080 | 3
            counts = struct.pack("!HHHH", 1 if question else 0, 0, 0, 0)
            with contextlib.suppress(OSError):
                self.sock.sendto(struct.pack("!HH", ident, reply_flags) + counts + question,
                                 peer)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.sock.close()


def first_question(query: bytes) -> bytes:
    """The question section's first entry (name, type, class), or b"" if malformed."""
    at = 12
    while at < len(query):
        length = query[at]
        if length == 0:
            end = at + 5
            return query[12:end] if end <= len(query) else b""
        if length & 0xC0:  # a compression pointer has no place in a question
            return b""
        at += 1 + length
    return b""


def host_address() -> str:
    """The address the host's default route leaves from: containers reach it."""
    out = run(["ip", "-4", "route", "get", "1.1.1.1"]).stdout.split()
    return out[out.index("src") + 1]

