"""The ``vmtask`` command end to end: real subprocesses against the private Redis and
the session's ``alpha`` worker, checked against the real files qemu-img sees."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from api import VirtualServer
from api.cli import EXIT_CODES, main
from tests.cli_runs import Cli, PtyProcess, Run, assert_one_error_line, run_cli
from tests.helpers import qemu_io
from workers.devtools.sandbox import RedisServer, WorkerProcess, free_port, wait_until

MiB = 1 << 20
E_INVALIDARG = "0x80070057"
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def image_info(path: Path, fmt: str | None = None) -> dict[str, Any]:
    forced = ["-f", fmt] if fmt else []
    out = subprocess.run(["qemu-img", "info", "--output=json", "-U", *forced, str(path)],
                         check=True, capture_output=True, text=True).stdout
    info: dict[str, Any] = json.loads(out)
    return info


def succeeded(run: Run) -> dict[str, Any]:
    assert run.code == 0, run
    doc: dict[str, Any] = run.json()
    assert (doc["result"], doc["percent_completed"], doc["error_hex"]) == (
        "Success", 100, "0x00000000"), run
    return doc


# -- disks -------------------------------------------------------------------------------


def test_disk_verbs_with_json_match_the_real_files(cli: Cli, root: Path, unique: str) -> None:
    # create dynamic, then real data in it so the copies below have bytes to carry
    doc = succeeded(cli("disk", "create", f"{unique}/base.qcow2", "--size-mb", "64",
                        "--type", "dynamic", "--json"))
    base = root / unique / "base.qcow2"
    assert UUID.match(doc["id"]) and doc["description"].startswith("Creating dynamic")
    assert doc["disk"]["file"] == f"{unique}/base.qcow2"
    assert (doc["disk"]["type"], doc["disk"]["format"], doc["disk"]["size_in_guest"]) == (
        "Dynamic", "qcow2", 64 * MiB)
    assert image_info(base)["virtual-size"] == 64 * MiB
    qemu_io(base, "qcow2", "write -P 0xa1 0 2M", "write -P 0xb2 40M 1M")

    # create fixed
    doc = succeeded(cli("disk", "create", f"{unique}/fixed.vhd", "--size-mb", "16",
                        "--type", "fixed", "--json"))
    assert doc["disk"]["type"] == "FixedSize"
    fixed = root / unique / "fixed.vhd"
    # A fixed VHD is raw data plus a footer, so qemu-img's probe alone would say "raw".
    assert fixed.read_bytes()[-512:].startswith(b"conectix")
    assert image_info(fixed, "vpc")["virtual-size"] == 16 * MiB
    assert fixed.stat().st_blocks * 512 >= 16 * MiB  # really allocated

    # info, against qemu-img's own view of the file
    info = cli("disk", "info", f"{unique}/base.qcow2", "--json")
    assert info.code == 0, info
    seen = image_info(base)
    assert info.json()["size_in_guest"] == seen["virtual-size"]
    assert info.json()["size_on_host"] == seen["actual-size"]
    assert info.json()["parent"] is None and info.json()["host_free_disk_space"] > 0

    # convert: a new fixed VHD with the same bytes; the source is untouched
    doc = succeeded(cli("disk", "convert", f"{unique}/base.qcow2", f"{unique}/copy.vhd",
                        "--type", "fixed", "--json"))
    assert doc["description"].startswith("Converting") and doc["disk"]["type"] == "FixedSize"
    copy = root / unique / "copy.vhd"
    assert copy.read_bytes()[-512:].startswith(b"conectix")
    assert image_info(copy, "vpc")["virtual-size"] == 64 * MiB
    qemu_io(copy, "vpc", "read -P 0xa1 0 2M", "read -P 0xb2 40M 1M", "read -P 0 2M 38M")
    qemu_io(base, "qcow2", "read -P 0xa1 0 2M")

    # compact: same content, still a valid image
    doc = succeeded(cli("disk", "compact", f"{unique}/base.qcow2", "--json"))
    assert doc["disk"]["file"] == f"{unique}/base.qcow2"
    subprocess.run(["qemu-img", "check", str(base)], check=True, capture_output=True)
    qemu_io(base, "qcow2", "read -P 0xa1 0 2M", "read -P 0xb2 40M 1M")

    # differencing child, written to, then merge-to a new disk and merge into the parent
    doc = succeeded(cli("disk", "create", f"{unique}/child.qcow2", "--parent",
                        f"{unique}/base.qcow2", "--json"))
    assert doc["disk"]["type"] == "Differencing"
    assert doc["disk"]["parent"]["file"] == f"{unique}/base.qcow2"
    child = root / unique / "child.qcow2"
    assert image_info(child)["backing-filename"].endswith("base.qcow2")
    qemu_io(child, "qcow2", "write -P 0xc3 1M 1M")

    doc = succeeded(cli("disk", "merge-to", f"{unique}/child.qcow2", f"{unique}/flat.img",
                        "--type", "dynamic", "--json"))
    assert (doc["disk"]["format"], doc["disk"]["parent"]) == ("raw", None)
    qemu_io(root / unique / "flat.img", "raw", "read -P 0xa1 0 1M", "read -P 0xc3 1M 1M",
            "read -P 0xb2 40M 1M")
    qemu_io(base, "qcow2", "read -P 0xa1 1M 1M")  # merge-to leaves the chain alone

    doc = succeeded(cli("disk", "merge", f"{unique}/child.qcow2", "--json"))
    assert doc["is_cancelable"] is False
    assert doc["disk"]["file"] == f"{unique}/base.qcow2"  # the result is the parent
    qemu_io(base, "qcow2", "read -P 0xa1 0 1M", "read -P 0xc3 1M 1M")


def test_human_output_has_a_progress_bar_and_a_success_line(cli: Cli, root: Path,
                                                            unique: str) -> None:
    run = cli("disk", "create", f"{unique}/plain.qcow2", "--size-mb", "8")
    assert run.code == 0, run
    # The bar is on stderr: the description, 100 %, the elapsed time and the ETA.
    assert re.search(r"Creating dynamic disk of 8 MB .*100%\s+\d+:\d\d:\d\d ETA", run.err), run
    assert "Traceback" not in run.err
    lines = run.out.splitlines()
    assert re.match(rf"Creating dynamic disk of 8 MB {unique}/plain.qcow2: Success "
                    r"\(\d+\.\ds, task [0-9a-f-]{36}\)$", lines[0]), run
    assert any(f"{unique}/plain.qcow2" in line and "Dynamic" in line for line in lines[1:]), run
    assert (root / unique / "plain.qcow2").exists()

    info = cli("disk", "info", f"{unique}/plain.qcow2")
    assert info.code == 0 and "8.0 MiB" in info.out and "qcow2" in info.out, info

    ping = cli("ping", "--duration-ms", "600", "--steps", "6")
    assert ping.code == 0 and "Ping: 600 ms in 6 steps: Success" in ping.out, ping
    assert "100%" in ping.err


# -- tasks -------------------------------------------------------------------------------


def test_no_wait_prints_only_the_id_and_task_wait_follows_it(cli: Cli, root: Path,
                                                             unique: str) -> None:
    run = cli("ping", "--duration-ms", "500", "--steps", "5", "--no-wait")
    assert run.code == 0 and run.err == "", run
    task_id = run.out.strip()
    assert UUID.match(task_id) and run.out == task_id + "\n", run
    succeeded(cli("task", "wait", task_id, "--json"))

    run = cli("disk", "create", f"{unique}/later.vhdx", "--size-mb", "4", "--no-wait",
              "--json")
    assert run.code == 0 and set(run.json()) == {"id"}, run
    doc = succeeded(cli("task", "wait", run.json()["id"], "--json"))
    assert doc["output"]["chain"][0]["file"] == f"{unique}/later.vhdx"
    assert (root / unique / "later.vhdx").exists()
    # `wait` is the old name of `task wait`
    again = cli("wait", run.json()["id"])
    assert again.code == 0 and ": Success" in again.out, again


def test_task_cancel_of_a_running_ping_ends_cancelled(cli: Cli) -> None:
    run = cli("ping", "--duration-ms", "30000", "--steps", "100", "--no-wait")
    assert run.code == 0, run
    task_id = run.out.strip()

    def progress() -> bool:
        shown = cli("task", "show", task_id, "--json")
        assert shown.code == 0, shown
        return bool(shown.json()["percent_completed"] > 0)

    wait_until(progress, 60, "the ping to report progress", interval=0.1)
    cancel = cli("task", "cancel", task_id, "--json")
    assert cancel.code == 0, cancel
    assert cancel.json()["cancel_requested"] is True
    waited = cli("task", "wait", task_id, "--json")
    assert waited.code == 11, waited  # 10 + VMTaskResult.Cancelled
    doc = waited.json()
    assert (doc["result"], doc["error_hex"], doc["is_complete"]) == (
        "Cancelled", "0x80004004", True)
    assert_one_error_line(waited, "Cancelled", "0x80004004")
    # Cancelling it again is refused: it is complete.
    again = cli("task", "cancel", task_id)
    assert again.code == 2, again
    assert_one_error_line(again, "already complete")


def test_task_show_and_list(cli: Cli) -> None:
    task_id = cli("ping", "--duration-ms", "100", "--steps", "2", "--no-wait").out.strip()
    succeeded(cli("task", "wait", task_id, "--json"))

    shown = cli("task", "show", task_id)
    assert shown.code == 0, shown
    for fragment in (task_id, "Ping: 100 ms in 2 steps", "SUCCESS", "100%", "Success",
                     "0x00000000 (S_OK)", "vmtask.ping"):
        assert fragment in shown.out, shown
    doc = cli("task", "show", task_id, "--json").json()
    assert (doc["id"], doc["host"], doc["output"]) == (task_id, "alpha", {"steps": 2})

    listed = cli("task", "list", "--json", "--limit", "20")
    assert listed.code == 0, listed
    assert task_id in [t["id"] for t in listed.json()]
    assert len(listed.json()) <= 20
    only = cli("task", "list", "--state", "success", "--host", "alpha", "--json").json()
    assert only and {(t["state"], t["host"]) for t in only} == {("SUCCESS", "alpha")}
    assert cli("task", "list", "--host", "nowhere", "--json").json() == []

    table = cli("task", "list", "--limit", "5")
    assert table.code == 0, table
    for header in ("id", "description", "state", "%", "result", "started", "elapsed"):
        assert header in table.out.splitlines()[0], table
    assert any(task_id in line and "Success" in line for line in table.out.splitlines())

    missing = cli("task", "show", str(uuid.uuid4()))
    assert missing.code == 4, missing
    assert_one_error_line(missing, "No task", E_INVALIDARG)


def test_hosts_lists_alpha(cli: Cli, alpha: WorkerProcess) -> None:
    run = cli("hosts", "--json")
    assert run.code == 0, run
    rows = {row["host"]: row for row in run.json()}
    row = rows["alpha"]
    assert row["storage_root"] == str(alpha.storage_root)
    assert row["storage_free_bytes"] > 0 and 0 <= row["heartbeat_age_seconds"] < 30
    assert alpha.proc is not None and row["pid"] == alpha.proc.pid
    assert isinstance(row["running_tasks"], int) and isinstance(row["vms"], int)
    human = cli("hosts")
    assert human.code == 0 and "alpha" in human.out and "free storage" in human.out, human


# -- errors and exit codes ------------------------------------------------------------------


def test_bad_input_is_one_line_with_e_invalidarg_and_exit_2(cli: Cli) -> None:
    run = cli("disk", "create", "x.vmdk", "--size-mb", "1")
    assert run.code == 2 and run.out == "", run
    assert_one_error_line(run, E_INVALIDARG, "x.vmdk")
    # Leaving the storage root is refused the same way, with ACCESS_DENIED.
    escape = cli("disk", "create", "../x.vhd", "--size-mb", "1")
    assert escape.code == 2 and escape.out == "", escape
    assert_one_error_line(escape, "0x80070005", "../x.vhd")

    as_json = cli("disk", "create", "x.vmdk", "--size-mb", "1", "--json")
    assert as_json.code == 2, as_json
    error = as_json.json()["error"]
    assert (error["type"], error["hresult_hex"], error["exit_code"]) == (
        "InvalidArgumentError", E_INVALIDARG, 2)
    assert_one_error_line(as_json, E_INVALIDARG)

    # Usage errors too are one line, with E_INVALIDARG and where to look.
    for args in (("disk", "create", "a.vhd"),
                 ("disk", "create", "a.vhd", "--size-mb", "1", "--parent", "b.vhd"),
                 ("disk", "convert", "a.vhd", "b.vhd"),
                 ("disk", "create", "a.vhd", "--size-mb", "lots"),
                 ("no-such-verb",), ("--url", "http://example.invalid", "hosts"),
                 ("ping", "--duration-ms", "-5")):
        bad = cli(*args)
        assert bad.code == 2 and bad.out == "", bad
        assert_one_error_line(bad, E_INVALIDARG)


def test_an_unreachable_redis_exits_3_with_one_line() -> None:
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    for args in (("hosts",), ("ping",), ("task", "list", "--json")):
        run = run_cli("--url", url, "--host", "alpha", *args)
        assert run.code == 3, run
        line = assert_one_error_line(run, "cannot be reached", "0x80010105")
        assert "secret" not in line  # the password is redacted


def test_failed_operations_exit_non_zero_with_the_hresult(cli: Cli, unique: str) -> None:
    missing = cli("disk", "info", f"{unique}/missing.vhd")
    assert missing.code == 4, missing  # not found
    assert_one_error_line(missing, "0x80070002", "missing.vhd")

    # A task that runs and fails: the exit code is 10 + its VMTaskResult.
    succeeded(cli("disk", "create", f"{unique}/a.qcow2", "--size-mb", "4", "--json"))
    succeeded(cli("disk", "create", f"{unique}/b.vhd", "--size-mb", "4", "--json"))
    clash = cli("disk", "convert", f"{unique}/a.qcow2", f"{unique}/b.vhd", "--type", "dynamic",
                "--json")
    assert clash.code == 14, clash  # DiskRelatedError
    doc = clash.json()
    assert (doc["result"], doc["error_hex"]) == ("DiskRelatedError", "0x80070050")
    assert doc["disk"] is None  # no resulting disk on failure
    assert_one_error_line(clash, "DiskRelatedError", "0x80070050")

    # A differencing disk must be qcow2: refused before queueing.
    refused = cli("disk", "create", f"{unique}/c.vhd", "--parent", f"{unique}/a.qcow2")
    assert refused.code == 2, refused
    assert_one_error_line(refused, E_INVALIDARG)


def test_an_unexpected_exception_is_one_line_exit_1(monkeypatch: pytest.MonkeyPatch) -> None:
    # No subprocess can be made to hit a bug on purpose; break the library in-process.
    def broken(self: VirtualServer) -> list[str]:
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(VirtualServer, "hosts", property(broken))
    result = CliRunner().invoke(main, ["--url", "redis://127.0.0.1:1/0", "hosts", "--json"])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == ("vmtask: error: unexpected RuntimeError: something broke "
                                     "[0x8000FFFF (E_UNEXPECTED)]")
    assert json.loads(result.stdout)["error"]["hresult"] == 0x8000FFFF


def test_every_verb_takes_json_and_the_exit_codes_are_documented() -> None:
    def verbs(group: click.Group, prefix: str = "") -> Iterator[tuple[str, click.Command]]:
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                if command.invoke_without_command:  # ``vmtask hosts`` lists them
                    yield f"{prefix}{name}", command
                yield from verbs(command, f"{prefix}{name} ")
            else:
                yield f"{prefix}{name}", command

    found = dict(verbs(main))
    assert {"disk create", "disk info", "disk convert", "disk copy", "disk compact",
            "disk merge",
            "disk merge-to", "vm create", "vm list", "vm show", "vm start", "vm save",
            "vm pause", "vm resume", "vm reset", "vm off", "vm shutdown", "vm restart",
            "vm logoff", "vm merge-undo", "vm discard-undo", "vm delete", "task show",
            "task wait", "task cancel", "task list", "hosts", "hosts evacuate",
            "hosts maintenance", "ping", "wait", "demo", "worker"} <= set(found)
    for path, command in found.items():
        options = {opt for param in command.params for opt in getattr(param, "opts", [])}
        if path not in ("worker", "exporter"):  # long-running servers, no result to print
            assert "--json" in options, path
    assert {0, 1, 2, 3, 4, *range(11, 19), 130} == set(EXIT_CODES)


# -- Ctrl-C ------------------------------------------------------------------------------


@pytest.fixture
def terminal(redis_server: RedisServer, alpha: WorkerProcess) -> Iterator[
        Callable[..., PtyProcess]]:
    started: list[PtyProcess] = []

    def start(*args: str) -> PtyProcess:
        process = PtyProcess(["--url", redis_server.url, "--host", "alpha", *args])
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


def test_ctrl_c_offers_to_cancel_and_yes_cancels(terminal: Callable[..., PtyProcess]) -> None:
    ping = terminal("ping", "--duration-ms", "30000", "--steps", "100")
    ping.expect(rb"Ping: 30000 ms in 100 steps.*?\b[1-9]\d*%")  # the live bar moves
    ping.proc.send_signal(signal.SIGINT)
    ping.expect(rb"Cancel task [0-9a-f-]{36} \(Ping: 30000 ms in 100 steps\)\? \[Y/n\]")
    ping.send(b"y\n")
    assert ping.finish() == 11, ping.text()  # Cancelled
    assert "0x80004004" in ping.text() and "Traceback" not in ping.text()


def test_ctrl_c_then_no_keeps_following(terminal: Callable[..., PtyProcess]) -> None:
    ping = terminal("ping", "--duration-ms", "3000", "--steps", "30")
    ping.expect(rb"\b[1-9]\d*%")
    ping.proc.send_signal(signal.SIGINT)
    ping.expect(rb"Cancel task .*\[Y/n\]")
    ping.send(b"n\n")
    assert ping.finish() == 0, ping.text()
    assert "Ping: 3000 ms in 30 steps: Success" in ping.text()


def test_ctrl_c_then_end_of_input_leaves_the_task_running(
    terminal: Callable[..., PtyProcess], cli: Cli
) -> None:
    ping = terminal("ping", "--duration-ms", "30000", "--steps", "100")
    ping.expect(rb"\b[1-9]\d*%")
    ping.proc.send_signal(signal.SIGINT)
    ping.expect(rb"\[Y/n\]")
    ping.send(b"\x04")  # Ctrl-D: end of input at the prompt
    assert ping.finish() == 130, ping.text()
    task_id = re.search(r"task ([0-9a-f-]{36}) keeps running", ping.text())
    assert task_id is not None, ping.text()
    assert cli("task", "show", task_id[1], "--json").json()["state"] == "STARTED"
    assert cli("task", "cancel", task_id[1], "--wait").code == 11
