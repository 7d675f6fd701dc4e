"""Worker hosts as separate machines: one Linux network namespace per host.

Each test that asks for `network` gets its own topology, every name in it unique::

    root namespace        vmtN  10.231.N.1/24     redis-server binds this (and 127.0.0.1)
         | veth
    hub namespace         br0 (a bridge with every veth's hub end)
         | veth pN
    host namespace        eth0  10.231.N.(10+i)/24, lo   one celery worker per host

A host reaches Redis and the other hosts only through the bridge, by address: its
127.0.0.1 is its own.  So a worker's transfers work only through the address it
advertises (``VMTASK_ADVERTISE_ADDRESS``), and faults are made in the network:

- `cut` takes a host's cable out (its hub end down): it reaches nothing, Redis included;
- `partition` cuts two hosts from each other only, both still reaching Redis: each
  gets a permanent neighbour entry for the other that names a MAC nobody has, so
  their packets are silently lost, as across a broken link (no nftables or tc
  actions are needed, and none are installed here).

Everything is removed at the end, even after a failure; namespaces left by a killed
test run (named after its pid) are removed by the next one.
"""

from __future__ import annotations

import fcntl
import functools
import ipaddress
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from workers.devtools.sandbox import RedisServer, WorkerProcess, wait_until

SUBNET = "10.231.{}.0/24"
_PREFIX = "vmt"
_NS_NAME = re.compile(rf"^{_PREFIX}(\d+)-")
_LOCK = Path("/tmp/vmtask-netns.lock")
NOWHERE_MAC = "02:00:5e:00:de:ad"  # locally administered; no interface has it


def skip_reason() -> str | None:
    """Why the harness cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "needs iproute2's ip"
    return _probe()


@functools.cache
def _probe() -> str | None:
    """Make and remove a namespace with a bridge and a veth: what the harness needs
    (a container without CAP_NET_ADMIN / CAP_SYS_ADMIN cannot)."""
    name = f"{_PREFIX}{os.getpid()}-probe"
    steps = [["netns", "add", name], ["-n", name, "link", "add", "br0", "type", "bridge"],
             ["-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1"]]
    try:
        for step in steps:
            done = ip(*step, check=False)
            if done.returncode != 0:
                return f"ip {' '.join(step)} fails here: {done.stderr.strip()}"
        return None
    finally:
        ip("netns", "delete", name, check=False)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace(name: str) -> None:
    """SIGKILL what still runs in one of our namespaces, then remove it."""
    pids = ip("netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    ip("netns", "delete", name, check=False)


def sweep_stale() -> None:
    """Namespaces of test runs that died without cleaning up (their veths go with them)."""
    for line in ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = _NS_NAME.match(name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            _kill_namespace(name)


@dataclass
class Host:
    name: str
    namespace: str
    address: str
    hub_port: str
    worker: WorkerProcess | None = None

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """A command inside this host's namespace."""
        return subprocess.run(["ip", "netns", "exec", self.namespace, *args],
                              capture_output=True, text=True, timeout=timeout)

    def can_connect(self, address: str, port: int, timeout: float = 2.0) -> bool:
        """Whether a TCP connection from this host to ``address:port`` is accepted."""
        code = ("import socket,sys\n"
                "try:\n"
                f"    socket.create_connection(({address!r}, {port}), timeout={timeout}).close()\n"
                "except OSError:\n"
                "    sys.exit(1)\n")
        return self.run(sys.executable, "-c", code, timeout=timeout + 30).returncode == 0


@dataclass
class Network:
    """One test's namespaces; `close` removes them whatever state they are in."""

    directory: Path
    index: int = 0
    tag: str = ""
    hosts: dict[str, Host] = field(default_factory=dict)
    redis: RedisServer | None = None
    namespaces: list[str] = field(default_factory=list)

    @property
    def hub(self) -> str:
        return f"{self.tag}-hub"

    @property
    def root_link(self) -> str:
        return f"{_PREFIX}{self.index}"

    def address(self, last: int) -> str:
        network = ipaddress.ip_network(SUBNET.format(self.index))
        return str(network.network_address + last)

    @property
    def redis_address(self) -> str:
        return self.address(1)

    def create(self) -> Network:
        with _LOCK.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            sweep_stale()
            used = ip("-4", "-o", "addr", "show", check=False).stdout
            free = [n for n in range(1, 255) if f" 10.231.{n}." not in used]
            self.index = random.choice(free)
            self.tag = f"{_PREFIX}{os.getpid()}-{self.index}"
            ip("netns", "add", self.hub)
            self.namespaces.append(self.hub)
            ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            ip("link", "add", self.root_link, "type", "veth", "peer", "name", "uplink",
               "netns", self.hub)
            ip("addr", "add", f"{self.redis_address}/24", "dev", self.root_link)
        ip("link", "set", self.root_link, "up")
        ip("-n", self.hub, "link", "set", "dev", "uplink", "master", "br0")
        for dev in ("uplink", "br0", "lo"):
            ip("-n", self.hub, "link", "set", "dev", dev, "up")
        return self

    def add_host(self, name: str) -> Host:
        number = len(self.hosts) + 1
        host = Host(name, f"{self.tag}-{name}", self.address(9 + number), f"p{number}")
        ip("netns", "add", host.namespace)
        self.namespaces.append(host.namespace)
        ip("-n", host.namespace, "link", "add", "eth0", "type", "veth", "peer", "name",
           host.hub_port, "netns", self.hub)
        ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
        for dev in ("lo", "eth0"):
            ip("-n", host.namespace, "link", "set", dev, "up")
        ip("-n", self.hub, "link", "set", host.hub_port, "master", "br0", "up")
        self.hosts[name] = host
        return host

    def start_redis(self) -> RedisServer:
        self.redis = RedisServer(self.directory / "redis",
                                 bind=("127.0.0.1", self.redis_address))
        # No password on a private bridge: let the hosts in without protected mode.
        self.redis.extra_args = ["--protected-mode", "no"]
        return self.redis.start()

    def start_worker(self, name: str, *, concurrency: int = 2,
                     env: dict[str, str] | None = None, wait: bool = True,
                     include: tuple[str, ...] | None = None) -> WorkerProcess:
        """The host's worker, started; ``env`` and ``include`` (the modules it loads,
        e.g. `tests.pause_points.PAUSING`) count at its first start only: a restart
        is the same worker."""
        host = self.hosts[name]
        assert self.redis is not None
        if host.worker is None:
            host.worker = WorkerProcess(
                self.redis.url_at(self.redis_address), name, self.directory / name,
                self.directory, concurrency=concurrency,
                env={"VMTASK_ADVERTISE_ADDRESS": host.address, **(env or {})},
                prefix=("ip", "netns", "exec", host.namespace),
                **({"include": include} if include is not None else {}))
        host.worker.start(wait=wait)
        return host.worker

    # -- faults ---------------------------------------------------------------------

    def throttle(self, name: str, mbit: int) -> None:
        """Limit what the host sends (e.g. an export's bytes), so a copy takes a while."""
        namespace = self.hosts[name].namespace
        for args in (["qdisc", "replace", "dev", "eth0", "root", "handle", "1:", "htb",
                      "default", "10"],
                     ["class", "replace", "dev", "eth0", "parent", "1:", "classid", "1:10",
                      "htb", "rate", f"{mbit}mbit"]):
            done = subprocess.run(["tc", "-n", namespace, *args], capture_output=True,
                                  text=True, timeout=30)
            if done.returncode != 0:
                raise RuntimeError(f"tc {' '.join(args)}: {done.stderr.strip()}")

    def cut(self, name: str) -> None:
        """Pull the host's cable: it reaches nothing, Redis included, until `mend`."""
        ip("-n", self.hub, "link", "set", self.hosts[name].hub_port, "down")

    def mend(self, name: str) -> None:
        ip("-n", self.hub, "link", "set", self.hosts[name].hub_port, "up")

    def partition(self, a: str, b: str) -> None:
        """Hosts ``a`` and ``b`` lose each other's packets silently; both keep Redis."""
        for here, there in ((a, b), (b, a)):
            ip("-n", self.hosts[here].namespace, "neigh", "replace",
               self.hosts[there].address, "lladdr", NOWHERE_MAC, "dev", "eth0",
               "nud", "permanent")

    def heal(self, a: str, b: str) -> None:
        for here, there in ((a, b), (b, a)):
            ip("-n", self.hosts[here].namespace, "neigh", "delete",
               self.hosts[there].address, "dev", "eth0", check=False)

    def close(self) -> None:
        for host in self.hosts.values():
            if host.worker is not None:
                host.worker.stop()
        if self.redis is not None:
            self.redis.stop()
        for name in reversed(self.namespaces):
            _kill_namespace(name)
        ip("link", "delete", self.root_link, check=False)


def wait_live(net: Network, name: str, timeout: float = 60) -> None:
    """Until the host's worker heartbeats through the network again."""
    worker = net.hosts[name].worker
    assert worker is not None and worker.proc is not None
    pid = worker.proc.pid
    wait_until(lambda: (worker.heartbeat() or {}).get("pid") == pid, timeout,
               f"host {name} to heartbeat")
