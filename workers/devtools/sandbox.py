"""Local real processes for the demo, tests and benchmarks: redis-server, workers.

Nothing here talks to a Redis it did not start.  Every wait is a condition polled
against a deadline; every process is stopped (its whole process group) on exit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from api.protocol import keys
from api.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_TASK_MODULE = "tests.worker_tasks"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.02
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def stop_process_group(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)  # the main process; it stops its own pool
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers, e.g. pool children
    except ProcessLookupError:
        pass
    proc.wait()


@dataclass(frozen=True)
class TlsFiles:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate."""

    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def client_env(self) -> dict[str, str]:
        """What a producer or worker needs to reach a Redis that asks for client certs."""
        return {"VMTASK_REDIS_CA": str(self.ca), "VMTASK_REDIS_CERT": str(self.client_cert),
                "VMTASK_REDIS_KEY": str(self.client_key)}


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def _signed_cert(directory: Path, name: str, ca: Path, ca_key: Path, extensions: str) -> None:
    key, csr, cert = (directory / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
    ext_file = directory / f"{name}.ext"
    ext_file.write_text(extensions)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN=vmtask test {name}")
    _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
             "-out", cert, "-days", "2", "-extfile", ext_file)


def make_tls_files(directory: Path, ca_name: str = "ca") -> TlsFiles:
    """A CA and the certificates it signs, made with the ``openssl`` command."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / f"{ca_name}.crt", directory / f"{ca_name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2",
             "-subj", f"/CN=vmtask test {ca_name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    common = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
    _signed_cert(directory, f"{ca_name}-server", ca, ca_key,
                 common + "extendedKeyUsage=serverAuth\n"
                 "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _signed_cert(directory, f"{ca_name}-client", ca, ca_key,
                 common + "extendedKeyUsage=clientAuth\n")
    return TlsFiles(ca, ca_key, directory / f"{ca_name}-server.crt",
                    directory / f"{ca_name}-server.key", directory / f"{ca_name}-client.crt",
                    directory / f"{ca_name}-client.key")


def make_qemu_tls_dir(directory: Path, ca: TlsFiles, address: str) -> Path:
    """A host's directory as QEMU's ``tls-creds-x509`` reads it: ``ca``'s CA, a server
    certificate for ``address`` (the one it advertises) and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    # QEMU itself checks the key usage: a TLS key needs encipherment as well.
    common = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
    _signed_cert(directory, "server", ca.ca, ca.ca_key,
                 common + f"extendedKeyUsage=serverAuth\nsubjectAltName=IP:{address}\n")
    _signed_cert(directory, "client", ca.ca, ca.ca_key,
                 common + "extendedKeyUsage=clientAuth\n")
    for role in ("server", "client"):
        (directory / f"{role}.crt").rename(directory / f"{role}-cert.pem")
        (directory / f"{role}.key").rename(directory / f"{role}-key.pem")
    (directory / "ca-cert.pem").write_bytes(ca.ca.read_bytes())
    return directory


class RedisServer:
    """A redis-server of our own on a free port; stop() and start() keep the port.

    With ``tls``, it listens only on a TLS port (``--port 0``) and asks clients for
    a certificate signed by the CA.  With ``acl_file``, users come from that file,
    and ``username`` / ``password`` are the ones `client` (the harness) uses.
    """

    def __init__(self, directory: Path, *, appendonly: bool = False,
                 password: str | None = None, tls: TlsFiles | None = None,
                 acl_file: Path | None = None, username: str | None = None,
                 bind: tuple[str, ...] = ("127.0.0.1",)) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.appendonly = appendonly
        self.password = password
        self.tls = tls
        self.acl_file = acl_file
        self.username = username
        # The harness's own client uses the first address; others serve e.g. a
        # network namespace's bridge.
        self.bind = bind
        # Further redis-server arguments, e.g. ``--replicaof host port``.
        self.extra_args: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f"{self.username or ''}:{self.password}@" if self.password else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}{self.bind[0]}:{self.port}/0"

    def url_at(self, address: str) -> str:
        """The URL through another of the addresses it binds (``bind``)."""
        assert address in self.bind, f"redis-server does not bind {address}"
        return self.url.replace(f"@{self.bind[0]}:", f"@{address}:").replace(
            f"//{self.bind[0]}:", f"//{address}:")

    def url_for(self, username: str, password: str) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{username}:{password}@127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        tls: dict[str, Any] = {}
        if self.tls is not None:
            tls = {"ssl_ca_certs": str(self.tls.ca), "ssl_certfile": str(self.tls.client_cert),
                   "ssl_keyfile": str(self.tls.client_key)}
        return redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=5,
                                    socket_connect_timeout=5, **tls)

    def start(self) -> RedisServer:
        args = [
            "redis-server", "--bind", *self.bind,
            "--save", "", "--appendonly", "yes" if self.appendonly else "no",
            "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log"),
        ]
        if self.tls is not None:
            args += ["--port", "0", "--tls-port", str(self.port),
                     "--tls-cert-file", str(self.tls.server_cert),
                     "--tls-key-file", str(self.tls.server_key),
                     "--tls-ca-cert-file", str(self.tls.ca), "--tls-auth-clients", "yes"]
        else:
            args += ["--port", str(self.port)]
        if self.acl_file is not None:
            args += ["--aclfile", str(self.acl_file)]
        elif self.password:
            args += ["--requirepass", self.password]
        args += self.extra_args
        self.proc = subprocess.Popen(args, start_new_session=True)

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")
                raise RuntimeError(f"redis-server exited early:\n{log}")
            try:
                return bool(self.client().ping())
            except redis.ConnectionError:
                return False

        wait_until(ready, 20, f"redis-server on port {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)
            self.proc = None


class WorkerProcess:
    """A real ``celery -A workers worker`` serving one host."""

    def __init__(self, redis_url: str, host: str, storage_root: Path, log_dir: Path, *,
                 concurrency: int = 2, env: Mapping[str, str] | None = None,
                 include: tuple[str, ...] = (TEST_TASK_MODULE,),
                 node_name: str | None = "", prefix: tuple[str, ...] = ()) -> None:
        self.redis_url = redis_url
        self.host = host
        self.storage_root = storage_root
        self.concurrency = concurrency
        self.extra_env = dict(env or {})
        self.include = include
        # "": a unique name carrying the host; None: no -n, Celery's default naming.
        self.node_name = node_name
        # Runs the worker through a command that execs it, e.g. ``ip netns exec NS``.
        self.prefix = prefix
        self.log_path = log_dir / f"worker-{host}-{uuid.uuid4().hex[:6]}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "VMTASK_REDIS_URL": self.redis_url,
            "VMTASK_HOST": self.host,
            "VMTASK_STORAGE_ROOT": str(self.storage_root),
            "VMTASK_ACCEL": "tcg",
            "PYTHONPATH": str(REPO_ROOT),
        })
        env.update(self.extra_env)
        return env

    def node_arguments(self) -> list[str]:
        if self.node_name is None:
            return []
        return ["-n", self.node_name or f"{self.host}-{uuid.uuid4().hex[:6]}@%h"]

    def start(self, wait: bool = True) -> WorkerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "celery", "-A", "workers", "worker",
             "--loglevel", "INFO", "--pool", "prefork", "-c", str(self.concurrency),
             *self.node_arguments(),
             *(["--include", ",".join(self.include)] if self.include else []),
             "--without-gossip", "--without-mingle"],
            cwd=REPO_ROOT, env=self.environment(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        if wait:
            self.wait_ready()
        return self

    def heartbeat(self) -> dict[str, Any] | None:
        # The worker's own settings: its TLS files and Redis user reach the heartbeat.
        client = Settings.from_env(self.environment()).endpoint.client(5.0)
        try:
            raw = client.get(keys.host_heartbeat(self.host))
        except redis.ConnectionError:
            return None
        return json.loads(raw) if raw else None

    def wait_ready(self, timeout: float = 60) -> None:
        assert self.proc is not None

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log()}")
            beat = self.heartbeat()
            return beat is not None and beat.get("pid") == self.proc.pid  # type: ignore[union-attr]

        wait_until(ready, timeout, f"worker for host {self.host}", interval=0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def child_pids(self) -> list[int]:
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-g", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split() if int(p) != self.proc.pid]

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)
            self.proc = None

    def kill(self) -> None:
        """kill -9 the worker and its pool: nothing gets to clean up."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None


class SentinelCluster:
    """A primary, ``replicas`` replicas and three sentinels (``redis-server --sentinel``),
    all on free ports of 127.0.0.1, watching the master ``name``.

    ``down_after_ms`` is how long a silent primary is judged down; with 1000 ms
    and three sentinels a killed primary is replaced in about 2.5 s.
    """

    def __init__(self, directory: Path, *, name: str = "vmtask", replicas: int = 1,
                 sentinels: int = 3, down_after_ms: int = 1000) -> None:
        self.directory = directory
        self.name = name
        self.down_after_ms = down_after_ms
        self.nodes = [RedisServer(directory / f"node{i}") for i in range(1 + replicas)]
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.sentinel_procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """The Sentinel URL clients use, with the master name in it."""
        hosts = ";".join(f"sentinel://127.0.0.1:{p}" for p in self.sentinel_ports)
        return hosts.replace(f":{self.sentinel_ports[0]}",
                             f":{self.sentinel_ports[0]}/0?master_name={self.name}", 1)

    def sentinel(self, index: int = 0) -> redis.Redis:
        return redis.Redis(port=self.sentinel_ports[index], decode_responses=True,
                           socket_timeout=5, socket_connect_timeout=5)

    def master_view(self, index: int) -> dict[str, str]:
        """SENTINEL MASTER as a dict (redis-py 6.4's parser of it fails)."""
        flat = self.sentinel(index).execute_command("SENTINEL", "MASTER", self.name)
        return dict(zip(flat[::2], flat[1::2], strict=True))

    def primary_port(self) -> int | None:
        """The primary's port as the first sentinel that answers sees it."""
        for index in range(len(self.sentinel_ports)):
            try:
                # Raw: redis-py 6.4's parser of this reply fails.
                address = self.sentinel(index).execute_command(
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
            except redis.RedisError:
                continue
            if address:
                return int(address[1])
        return None

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def primary(self) -> RedisServer:
        port = self.primary_port()
        assert port is not None, "no sentinel knows the primary"
        return self.node(port)

    def start(self) -> SentinelCluster:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> SentinelCluster:
        primary, *replicas = self.nodes
        primary.start()
        for replica in replicas:
            replica.extra_args = ["--replicaof", "127.0.0.1", str(primary.port)]
            replica.start()

        def in_sync() -> bool:
            info = primary.client().info("replication")
            return int(info.get("connected_slaves", 0)) == len(replicas) and all(
                r.client().info("replication").get("master_link_status") == "up"
                for r in replicas)

        wait_until(in_sync, 20, "the replicas to sync")
        for index, port in enumerate(self.sentinel_ports):
            folder = self.directory / f"sentinel{index}"
            folder.mkdir(parents=True, exist_ok=True)
            config = folder / "sentinel.conf"
            # A sentinel rewrites its configuration file: each gets its own.
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                f"logfile {folder / 'sentinel.log'}\n"
                f"sentinel monitor {self.name} 127.0.0.1 {primary.port} 2\n"
                f"sentinel down-after-milliseconds {self.name} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.name} 10000\n"
                f"sentinel parallel-syncs {self.name} 1\n")
            self.sentinel_procs.append(subprocess.Popen(
                ["redis-server", str(config), "--sentinel"], start_new_session=True,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        def sentinels_agree() -> bool:
            try:
                views = [self.master_view(i) for i in range(len(self.sentinel_ports))]
            except redis.RedisError:
                return False
            return all(int(v.get("num-other-sentinels", 0)) == len(self.sentinel_ports) - 1
                       and int(v.get("num-slaves", 0)) == len(replicas) for v in views)

        wait_until(sentinels_agree, 30, "the sentinels to see each other and the replicas",
                   interval=0.1)
        return self

    def kill_primary(self) -> RedisServer:
        """kill -9 the current primary; returns it (stopped, port kept)."""
        primary = self.primary()
        assert primary.proc is not None
        os.killpg(primary.proc.pid, signal.SIGKILL)
        primary.proc.wait()
        primary.proc = None
        return primary

    def named_primaries(self) -> set[int | None]:
        """The primary's port as each sentinel names it (None: it did not answer)."""
        named: set[int | None] = set()
        for index in range(len(self.sentinel_ports)):
            try:
                address = self.sentinel(index).execute_command(
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
            except redis.RedisError:
                named.add(None)
                continue
            named.add(int(address[1]) if address else None)
        return named

    def wait_failover(self, old_port: int, timeout: float = 30) -> int:
        """Until every sentinel names one new primary that answers as one; its port.

        Every sentinel, not the first: a client asks whichever sentinel answers
        first, and one that has not yet heard of the promotion (sentinels learn
        it through each other, every 2 s) still names the dead primary."""
        def promoted() -> int | None:
            named = self.named_primaries()
            if len(named) != 1:
                return None
            port = named.pop()
            if port is None or port == old_port:
                return None
            try:
                role = self.node(port).client().info("replication").get("role")
            except redis.RedisError:
                return None
            return port if role == "master" else None

        return int(wait_until(promoted, timeout, "Sentinel to promote a replica",
                              interval=0.05))

    def restart_as_replica(self, node: RedisServer, timeout: float = 30) -> None:
        """Start a killed old primary again: the sentinels make it a replica."""
        node.extra_args = []
        node.start()

        def demoted() -> Any:
            try:
                info = node.client().info("replication")
            except redis.RedisError:
                return False
            return info.get("role") == "slave" and info.get("master_link_status") == "up"

        wait_until(demoted, timeout, "the old primary to rejoin as a replica", interval=0.1)

    def stop(self) -> None:
        for proc in self.sentinel_procs:
            stop_process_group(proc, grace=5)
        self.sentinel_procs = []
        for node in self.nodes:
            node.stop()
