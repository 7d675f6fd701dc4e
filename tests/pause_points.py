"""A pause point for tests, loaded into a test worker with ``--include`` only.

Production code has no pause points.  A test that must kill a worker at one exact
step of a protocol starts that worker with

- ``VMTASK_TEST_PAUSE_BEFORE``: a QMP command name (``quit``, ``cont``, ...), and
- ``VMTASK_TEST_PAUSE_MARKER``: a file path,

and includes this module (`PAUSING`).  The worker's first call of that command
writes the marker (the pool process's pid) and then never returns, so the test
waits for the marker and kill -9s the worker there, no race involved.  Only
tests set these variables; a worker started without this module ignores them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from workers.devtools.sandbox import TEST_TASK_MODULE
from workers.engines.qemu_vm import monitor

PAUSING = (TEST_TASK_MODULE, __name__)


def pause_env(command: str, marker: Path) -> dict[str, str]:
    """The environment of a worker that stops for good before QMP ``command``."""
    return {"VMTASK_TEST_PAUSE_BEFORE": command, "VMTASK_TEST_PAUSE_MARKER": str(marker)}


def _install(command: str, marker: Path) -> None:
    original = monitor.Monitor.execute

    def execute(self: monitor.Monitor, name: str,
                arguments: Mapping[str, object] | None = None, *,
                timeout: float = monitor.QMP_TIMEOUT) -> Any:
        if name == command:
            marker.write_text(str(os.getpid()))
            while True:  # until the test kills this worker
                time.sleep(3600)
        return original(self, name, arguments, timeout=timeout)

    monitor.Monitor.execute = execute  # type: ignore[method-assign]


if os.environ.get("VMTASK_TEST_PAUSE_BEFORE") and os.environ.get("VMTASK_TEST_PAUSE_MARKER"):
    _install(os.environ["VMTASK_TEST_PAUSE_BEFORE"],
             Path(os.environ["VMTASK_TEST_PAUSE_MARKER"]))
