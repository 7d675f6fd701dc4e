"""The ``vmtask`` command as a subprocess: its environment, one run's outcome, and the
one-error-line rule every refusal follows."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from workers.devtools.sandbox import REPO_ROOT


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def __str__(self) -> str:  # what a failed assertion shows
        return f"exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


def cli_env() -> dict[str, str]:
    # Only the flags given in each test may choose the Redis and the host.
    env = {k: v for k, v in os.environ.items() if not k.startswith("VMTASK_")}
    env.pop("COLUMNS", None)
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def run_cli(*args: str, timeout: float = 180) -> Run:
    proc = subprocess.run([sys.executable, "-m", "api.cli", *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=cli_env(),
                          cwd=REPO_ROOT)
    return Run(proc.returncode, proc.stdout, proc.stderr)


Cli = Callable[..., Run]

PROGRESS_LINE = re.compile(r"\d+%\s+\d+:\d\d:\d\d ETA")


def assert_one_error_line(run: Run, *fragments: str) -> str:
    """stderr holds one line, the error (after the progress bar's last frame, if any)."""
    assert "Traceback" not in run.err, run
    lines = [line for line in run.err.strip().splitlines() if not PROGRESS_LINE.search(line)]
    assert len(lines) == 1 and lines[0].startswith("vmtask: error: "), run
    for fragment in fragments:
        assert fragment in lines[0], run
    return lines[0]
