"""Flower as the tests drive it: its credentials, the celery command that starts it, and
an HTTP client of its pages and API (basic auth)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

USER, PASSWORD = "ops", "flower-test-password"
CELERY = Path(sys.executable).parent / "celery"


class Flower:
    def __init__(self, port: int, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.port = port
        self.proc = proc
        self.log_path = log_path

    def get(self, path: str, auth: tuple[str, str] | None = (USER, PASSWORD)) -> tuple[int, str]:
        """(HTTP status, body); status 0 when nothing answers."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as error:
            return int(error.code), error.read().decode(errors="replace")
        except OSError:
            return 0, ""

    def post(self, path: str) -> tuple[int, str]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=b"",
                                         method="POST")
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as error:
            return int(error.code), error.read().decode(errors="replace")

    def state_of(self, task_id: str) -> str | None:
        status, body = self.get(f"/api/task/info/{task_id}")
        return json.loads(body).get("state") if status == 200 else None

    def get_json(self, path: str) -> Any:
        status, body = self.get(path)
        assert status == 200, f"GET {path}: {status} {body[:300]}"
        return json.loads(body)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
