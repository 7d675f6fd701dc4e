"""The task log's wording, clipping and redaction (`api.protocol.tasklog`)."""

from __future__ import annotations

import re
from importlib import resources

from api.protocol import tasklog


def test_the_lua_cap_is_the_documented_one() -> None:
    lua = resources.files("api.protocol").joinpath("lua", "task_log.lua").read_text("utf-8")
    match = re.search(r"local MAX_LINES, MAX_LINE_BYTES = (\d+), (\d+)", lua)
    assert match
    assert (int(match.group(1)), int(match.group(2))) == (tasklog.MAX_LINES,
                                                          tasklog.MAX_LINE_BYTES)


def test_secret_option_values_are_redacted_and_paths_kept() -> None:
    line = ("run: qemu-img convert --object secret,id=sec0,data=hunter2 "
            "--object tls-creds-psk,id=t,dir=/etc/vmtask/psk,endpoint=client,username=qemu "
            "-o encrypt.key-secret=sec0 'json:{\"password\": \"swordfish\", \"file\": \"a\"}' "
            "-vnc :0,password=on")
    out = tasklog.redact(line)
    assert "hunter2" not in out and "swordfish" not in out
    assert "dir=/etc/vmtask/psk" in out and "username=qemu" in out
    assert "password=on" in out  # QEMU's flag, not a password
    assert out.count(tasklog.REDACTED) == 3
    assert tasklog.redact("retry: redis://worker:s3cret@10.0.0.1:6379/0 away") == (
        "retry: redis://worker:<redacted>@10.0.0.1:6379/0 away")


def test_lines_are_one_line_and_clipped_to_1_kib_of_utf8() -> None:
    assert tasklog.clip("a\nb") == "a b"
    long = "é" * 2000
    clipped = tasklog.clip(long)
    assert len(clipped.encode()) <= tasklog.MAX_LINE_BYTES and clipped.endswith("...")


def test_transitions_are_worded() -> None:
    assert tasklog.format_entry({"t": "0", "m": "hello"}) == "1970-01-01T00:00:00.000Z hello"
    crash = tasklog.describe({"kind": "end", "state": "FAILURE", "result": "8",
                              "error": str(0x80010105), "text": "stopped", "judged": "1"})
    assert crash == ("crashed (its worker's lease expired): ThreadCrashError "
                     "0x80010105 (RPC_E_SERVERFAULT): stopped")
    assert tasklog.describe({"kind": "end", "state": "SUCCESS", "result": "0",
                             "error": "0", "text": "", "judged": "0"}) == "ended: Success"
    assert tasklog.describe({"kind": "cancel"}) == "cancel requested"
