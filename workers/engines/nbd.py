"""Images between hosts over NBD: a ``qemu-nbd`` export on the source, read by qemu.

Disk bytes travel host to host on QEMU's own NBD channel, never through Redis.  An
export is read-only, bound to the host's advertised address, on a port of the
configured range, and named by a one-time random token: a client that does not
know the name is refused by qemu-nbd itself.  ``qemu-nbd`` dies with the process
that started it (parent-death signal), so a killed worker leaves no export behind.

With the host's transfer credentials (`workers.engines.transfer_tls`: x509
certificates or a pre-shared key) the export speaks only TLS, and the client must
hold matching credentials.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from workers.engines.qemu_img.runner import kill_group
from workers.engines.transfer_tls import TransferCreds
from workers.failures import OperationFailed

READY_TIMEOUT = 10.0
_DIE_WITH_PARENT: list[str] = (
    ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
)


TLS_OBJECT_ID = "vmtasktls"


@dataclass(frozen=True)
class Export:
    address: str
    port: int
    name: str
    process: subprocess.Popen[bytes]
    creds: TransferCreds | None = None

    def alive(self) -> bool:
        return self.process.poll() is None


def new_export_name() -> str:
    """A one-time export name: knowing it is what lets a client read the export."""
    return secrets.token_urlsafe(24)


def file_spec(filename: str) -> str:
    """A file's own bytes, whatever format it holds (for a byte-exact copy)."""
    return "json:" + json.dumps({"driver": "raw",
                                 "file": {"driver": "file", "filename": filename}},
                                separators=(",", ":"))


def tls_object(creds: TransferCreds, endpoint: str) -> str:
    """The ``--object`` that gives qemu-nbd (``server``) or qemu-img (``client``) its
    credentials."""
    return creds.object_arg(TLS_OBJECT_ID, endpoint)


def client_spec(address: str, port: int, name: str, *, tls: bool = False) -> str:
    """What ``qemu-img`` opens to read an export: the raw guest view it serves.  With
    ``tls``, qemu-img must also get `tls_object` (``client``)."""
    nbd: dict[str, Any] = {"driver": "nbd", "server": {"type": "inet", "host": address,
                                                         "port": str(port)},
                           "export": name}
    if tls:
        nbd["tls-creds"] = TLS_OBJECT_ID
    return "json:" + json.dumps({"driver": "raw", "file": nbd}, separators=(",", ":"))


def _listening(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1.0):
            return True
    except OSError:
        return False


def port_free(address: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True


def _start(spec: str, address: str, port: int, name: str, pass_fds: Sequence[int],
           stderr: Any, creds: TransferCreds | None) -> subprocess.Popen[bytes] | None:
    """qemu-nbd listening on ``port``, or None when the port was taken meanwhile."""
    binary = shutil.which("qemu-nbd") or "qemu-nbd"
    # --persistent: the readiness probe's connection must not end the server; the
    # export lives until `serve` stops it.  --shared=2: the probe and the one client.
    args = [*_DIE_WITH_PARENT, binary, "--read-only", "--persistent", "--shared=2",
            "--bind", address, "--port", str(port), "--export-name", name]
    if creds is not None:
        args += ["--object", tls_object(creds, "server"), "--tls-creds", TLS_OBJECT_ID]
    args.append(spec)
    try:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=stderr, start_new_session=True,
                                   pass_fds=tuple(pass_fds),
                                   env={**os.environ, "LC_ALL": "C", "LANG": "C"})
    except FileNotFoundError as exc:
        raise OperationFailed("qemu-nbd is not installed on this worker host") from exc
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stderr.seek(0)
            text = stderr.read().decode(errors="replace")
            if "Address already in use" in text:
                return None
            raise OperationFailed(f"qemu-nbd could not serve the image: {text.strip()[:500]}")
        if _listening(address, port):
            return process
        time.sleep(0.05)
    kill_group(process)
    raise OperationFailed(f"qemu-nbd did not listen on {address}:{port} in time")


@contextmanager
def serve(spec: str, *, address: str, ports: tuple[int, int], name: str,
          pass_fds: Sequence[int] = (), creds: TransferCreds | None = None
          ) -> Iterator[Export]:
    """Export ``spec`` (a qemu filename, e.g. a pinned chain's ``json:``) read-only
    until the block ends, on a free port of ``ports`` at ``address``; TLS only, with
    ``creds``, when they are given."""
    low, high = ports
    candidates = list(range(low, high + 1))
    random.shuffle(candidates)  # concurrent transfers rarely race for the same port
    with tempfile.TemporaryFile() as stderr:
        for port in candidates:
            if not port_free(address, port):
                continue
            process = _start(spec, address, port, name, pass_fds, stderr, creds)
            if process is None:
                stderr.seek(0)
                stderr.truncate()
                continue
            try:
                yield Export(address, port, name, process, creds)
            finally:
                kill_group(process)
            return
    raise OperationFailed(f"No free transfer port in {low}-{high} on {address} "
                          "(VMTASK_TRANSFER_PORTS)")
