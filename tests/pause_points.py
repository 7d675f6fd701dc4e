"""A pause point for tests, loaded into a test worker with ``--include`` only.

Production code has no pause points.  A test that must kill a worker at one exact
step of a protocol starts that worker with

- ``VMTASK_TEST_PAUSE_BEFORE``: a QMP command name (``quit``, ``cont``, ...), or
  `UNACKED_WRITE`: kombu's record of a message it has just taken off a queue (the
  worker's main process, between its BRPOP and the unacked hash), and
- ``VMTASK_TEST_PAUSE_MARKER``: a file path,

and includes this module (`PAUSING`).  The worker's first call of that command
writes the marker (the pool process's pid) and waits for as long as the marker
exists, so the test waits for the marker and kill -9s the worker there, or lets
it go on by removing the marker, with no race either way.  Only tests set these
variables; a worker started without this module ignores them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from workers import transport
from workers.devtools.sandbox import TEST_TASK_MODULE
from workers.engines.qemu_vm import monitor

PAUSING = (TEST_TASK_MODULE, __name__)
UNACKED_WRITE = "kombu-unacked-write"


def pause_env(command: str, marker: Path) -> dict[str, str]:
    """The environment of a worker that stops for good before QMP ``command``."""
    return {"VMTASK_TEST_PAUSE_BEFORE": command, "VMTASK_TEST_PAUSE_MARKER": str(marker)}


def _hold(marker: Path) -> None:
    marker.write_text(str(os.getpid()))
    while marker.exists():  # until the test kills this worker or lets it go
        time.sleep(0.05)


def _install_unacked(marker: Path) -> None:
    original = transport.HardenedQoS.append
    paused: list[int] = []

    def append(self: transport.HardenedQoS, message: Any, delivery_tag: str) -> None:
        if not paused:
            paused.append(os.getpid())
            _hold(marker)
        original(self, message, delivery_tag)

    transport.HardenedQoS.append = append  # type: ignore[method-assign]


def _install(command: str, marker: Path) -> None:
    if command == UNACKED_WRITE:
        _install_unacked(marker)
        return
    original = monitor.Monitor.execute
    paused: list[int] = []

    def execute(self: monitor.Monitor, name: str,
                arguments: Mapping[str, object] | None = None, *,
                timeout: float = monitor.QMP_TIMEOUT) -> Any:
        if name == command and not paused:
            paused.append(os.getpid())
            _hold(marker)
        return original(self, name, arguments, timeout=timeout)

    monitor.Monitor.execute = execute  # type: ignore[method-assign]


if os.environ.get("VMTASK_TEST_PAUSE_BEFORE") and os.environ.get("VMTASK_TEST_PAUSE_MARKER"):
    _install(os.environ["VMTASK_TEST_PAUSE_BEFORE"],
             Path(os.environ["VMTASK_TEST_PAUSE_MARKER"]))
