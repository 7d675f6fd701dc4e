"""The ``vmtask`` command as a subprocess: its environment, one run's outcome, the
one-error-line rule every refusal follows, and a run on a pseudo-terminal."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
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


class PtyProcess:
    """The CLI on a pseudo-terminal, as a person at a terminal would run it."""

    def __init__(self, args: list[str]) -> None:
        import pty

        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))
        env = cli_env() | {"TERM": "xterm-256color"}
        # Ctrl-C as at a terminal: a suite started in the background by a
        # non-interactive shell inherits SIGINT ignored, and so would the CLI.
        self.proc = subprocess.Popen([sys.executable, "-m", "api.cli", *args], stdin=slave,
                                     stdout=slave, stderr=slave, env=env, cwd=REPO_ROOT,
                                     start_new_session=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                      signal.SIG_DFL))
        os.close(slave)
        self.output = b""

    def expect(self, pattern: bytes, timeout: float = 60) -> re.Match[bytes]:
        deadline = time.monotonic() + timeout
        while (found := re.search(pattern, self.output)) is None:
            left = deadline - time.monotonic()
            if left <= 0 or self._read(left) is False:
                raise AssertionError(f"no {pattern!r} in:\n{self.text()}")
        return found

    def _read(self, timeout: float) -> bool | None:
        """True: read something; None: nothing within the timeout; False: closed."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return None
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: every writer closed the terminal
            return False
        self.output += chunk
        return bool(chunk)

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def finish(self, timeout: float = 60) -> int:
        """Read until the process closes the terminal; its exit code."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and self._read(left) is not False:
            pass
        return self.proc.wait(timeout=10)

    def text(self) -> str:
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", self.output.decode(errors="replace"))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
