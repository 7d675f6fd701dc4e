"""Checks the test modules share: image bytes through qemu-io, and task success."""

from __future__ import annotations

import subprocess
from pathlib import Path

from api import VMTask, VMTaskResult


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


def assert_succeeded(task: VMTask, timeout: int = 120_000) -> None:
    assert task.wait_for_completion(timeout)
    snap = task.snapshot()
    assert snap.result is VMTaskResult.Success, (snap.description, hex(snap.error),
                                                 snap.error_description)


def pids_of(pattern: str) -> list[int]:
    """Pids of the processes whose command line matches ``pattern`` (pgrep -f)."""
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]
