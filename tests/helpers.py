"""Checks the test modules share: image bytes through qemu-io, digests and backing
chains, and task success."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis.connection

from api import VirtualServer, VMTask, VMTaskResult
from api.protocol import keys

MiB = 1 << 20


def qemu_io(path: Path, fmt: str, *commands: str) -> str:
    """Run qemu-io commands (writes, or reads that verify a pattern) on an image.

    Fails the test when qemu-io fails or any command reports a failure, e.g. a
    ``read -P`` whose bytes do not match.
    """
    args = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    result = subprocess.run([*args, str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{commands}: {result.stdout}{result.stderr}"
    lowered = result.stdout.lower()
    assert "fail" not in lowered and "error" not in lowered, result.stdout
    return result.stdout


def big_image(root: Path, name: str, size_mb: int) -> Path:
    """An image full of non-zero data, so copying it takes real time."""
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    chunk = os.urandom(MiB)
    with path.open("wb") as f:
        for _ in range(size_mb):
            f.write(chunk)
    return path


def serve_task_of(server: VirtualServer, pull_id: str) -> str:
    """The id of the source's serve task that a pull (copy or move) started."""
    raw = server.redis.hget(keys.task_record(pull_id), "arguments")
    assert raw is not None
    return str(json.loads(raw)["server_task_id"])


def peer_of(server: VirtualServer, task: VMTask, field: str) -> VMTask:
    """The other side of a transfer: the task whose id ``task`` holds in its argument
    ``field`` (``server_task_id`` for a pull's serve task)."""
    arguments = json.loads(server.redis.hget(keys.task_record(task.id), "arguments") or "{}")
    return server.get_task(arguments[field])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def backing_chain(top: Path) -> list[tuple[str, str | None]]:
    """(file name, backing file name as written in it) of each image, top first."""
    info = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json",
                           str(top)], capture_output=True, text=True, check=True).stdout
    return [(Path(i["filename"]).name, i.get("backing-filename")) for i in json.loads(info)]


def data_in_top(top: Path) -> int:
    """Bytes of guest data a qcow2 image itself holds (not its backing files)."""
    mapped = subprocess.run(["qemu-img", "map", "-U", "--output=json", "-f", "qcow2",
                             str(top)], capture_output=True, text=True, check=True).stdout
    return sum(e["length"] for e in json.loads(mapped) if e["depth"] == 0 and e["data"])


def assert_succeeded(task: VMTask, timeout: int = 120_000) -> None:
    assert task.wait_for_completion(timeout)
    snap = task.snapshot()
    assert snap.result is VMTaskResult.Success, (snap.description, hex(snap.error),
                                                 snap.error_description)


def kill_leftover_qemu(root: Path) -> None:
    """SIGKILL whatever still runs from under a storage root (a VM a test left)."""
    out = subprocess.run(["pgrep", "-f", str(root)], capture_output=True, text=True).stdout
    for pid in out.split():
        os.kill(int(pid), signal.SIGKILL)


def pids_of(pattern: str) -> list[int]:
    """Pids of the processes whose command line matches ``pattern`` (pgrep -f)."""
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


@contextmanager
def wire_counter() -> Iterator[collections.Counter[str]]:
    """Every command this process sends through redis-py (kombu's too), by name;
    ``counter["<sends>"]`` counts the writes to a socket."""
    counter: collections.Counter[str] = collections.Counter()
    cls = redis.connection.AbstractConnection
    send_command, pack_commands, send_packed = (cls.send_command, cls.pack_commands,
                                                cls.send_packed_command)

    def name(arg: Any) -> str:
        return (arg.decode() if isinstance(arg, bytes) else str(arg)).upper()

    def counted_send(self: Any, *args: Any, **kwargs: Any) -> Any:
        counter[name(args[0])] += 1
        return send_command(self, *args, **kwargs)

    def counted_pack(self: Any, commands: Any) -> Any:
        for command in commands:
            counter[name(command[0])] += 1
        return pack_commands(self, commands)

    def counted_packed(self: Any, *args: Any, **kwargs: Any) -> Any:
        counter["<sends>"] += 1
        return send_packed(self, *args, **kwargs)

    cls.send_command, cls.pack_commands = counted_send, counted_pack  # type: ignore[method-assign]
    cls.send_packed_command = counted_packed  # type: ignore[method-assign]
    try:
        yield counter
    finally:
        cls.send_command, cls.pack_commands = send_command, pack_commands  # type: ignore[method-assign]
        cls.send_packed_command = send_packed  # type: ignore[method-assign]


def same(image: Path, raw: Path) -> bool:
    """A qcow2 image reads the same bytes as a raw file (`qemu-img compare`)."""
    result = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(image),
                             str(raw)], capture_output=True, text=True)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 0


def bitmaps(image: Path) -> dict[str, list[str]]:
    """The image's persistent bitmaps and their flags, from its header."""
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(image)],
                                     check=True, capture_output=True, text=True).stdout)
    found = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    return {b["name"]: b["flags"] for b in found}
