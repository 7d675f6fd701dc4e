"""The task log (`task.log()`, `vmtask task log ID -f`): real Redis, real workers, real
qemu-img.  What a task's operation wrote, in order and time-stamped; its end, whether
it succeeded, was cancelled or its worker was killed; expiry with the record; a
follower that prints lines as they are written; and no secret in it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from api import VirtualServer, VMHardDiskType, VMTaskResult, errors
from api.protocol import keys, tasklog
from api.scripts import Scripts
from tests.cli_runs import cli_env
from tests.helpers import assert_succeeded as done
from workers.devtools.sandbox import REPO_ROOT, RedisServer, wait_until

STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (.*)$")


def parsed(lines: list[str]) -> list[tuple[float, str]]:
    """(seconds since the epoch, text) of each line; every line must be time-stamped."""
    out = []
    for line in lines:
        match = STAMP.match(line)
        assert match, line
        when = datetime.fromisoformat(match.group(1).replace("Z", "+00:00"))
        out.append((when.timestamp(), match.group(2)))
    return out


def index_of(texts: list[str], pattern: str) -> int:
    for i, text in enumerate(texts):
        if re.search(pattern, text):
            return i
    raise AssertionError(f"no line matches {pattern!r} in:\n" + "\n".join(texts))


def test_a_convert_logs_its_phases_and_qemu_img_command_in_order(
        server: VirtualServer, root: Path) -> None:
    done(server.create_dynamic_virtual_hard_disk("log/src.qcow2", 8))
    task = server.get_hard_disk("log/src.qcow2").convert("log/dst.vhd", VMHardDiskType.FixedSize)
    done(task)
    snap = task.snapshot()
    entries = parsed(task.log())
    texts = [text for _when, text in entries]
    order = [index_of(texts, r"^started on worker alpha:"),
             index_of(texts, r"^phase: copy src\.qcow2 \(qcow2, 8388608 bytes\) into a fixed vpc"),
             # The source is opened by the worker (its chain pinned), qemu-img reads
             # it by descriptor; the output is a temporary file beside the target.
             index_of(texts, r"^run: qemu-img convert -p -f qcow2 -O vpc -o subformat=fixed\S* "
                             r"\S+ \S*log/\.dst\.vhd\.vmtask-\S+\.tmp$"),
             index_of(texts, r"^qemu-img convert: exit status 0 after \d+\.\d s$"),
             index_of(texts, r"^phase: allocate every block"),
             index_of(texts, r"^phase: publish \S*log/dst\.vhd$"),
             index_of(texts, r"^ended: Success$")]
    assert order == sorted(order), texts
    assert order[-1] == len(texts) - 1  # the end line is the last
    times = [when for when, _text in entries]
    assert times == sorted(times), entries
    assert snap.started is not None and snap.finished is not None
    # Stamped by the clocks of this machine, to the millisecond.
    assert snap.started - 0.002 <= times[0] and times[-1] <= snap.finished + 0.002


def test_tail_reads_the_last_lines(server: VirtualServer) -> None:
    task = server.ping(duration_ms=200, steps=4)
    done(task)
    every = task.log()
    assert [re.sub(STAMP, r"\2", line) for line in every] == [
        f"started on worker {every[0].split('started on worker ')[1]}",
        "step 1/4", "step 2/4", "step 3/4", "step 4/4", "ended: Success"]
    assert task.log(tail=2) == every[-2:]
    assert task.log(tail=100) == every
    assert task.log(tail=0) == []
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(errors.InvalidArgumentError):
            task.log(tail=bad)  # type: ignore[arg-type]
    with pytest.raises(errors.TaskNotFoundError):
        server.get_task("no-such-task").log()


def test_a_cancelled_task_says_so(server: VirtualServer) -> None:
    task = server.ping(duration_ms=60_000, steps=600)
    wait_until(lambda: task.percent_completed > 0, 20, "progress")
    task.cancel()
    assert task.wait_for_completion(20_000)
    assert task.result is VMTaskResult.Cancelled
    texts = [text for _when, text in parsed(task.log())]
    assert index_of(texts, r"^cancel requested$") < len(texts) - 1
    assert re.match(r"^ended: Cancelled 0x80004004 \(E_ABORT\)", texts[-1]), texts


def test_a_task_cancelled_in_the_queue_says_so(server: VirtualServer,
                                              beta: Any) -> None:
    # beta runs one task at a time: the second waits in the queue.
    busy = server.ping(duration_ms=30_000, steps=300, host="beta")
    queued = server.ping(host="beta")
    wait_until(lambda: busy.percent_completed > 0, 20, "the first task running")
    queued.cancel()
    busy.cancel()
    assert queued.result is VMTaskResult.Cancelled
    (line,) = queued.log()
    assert line.endswith("ended: Cancelled 0x80004004 (E_ABORT): Cancelled before it started")
    assert busy.wait_for_completion(20_000)


def test_a_killed_worker_leaves_the_crash_line_last(spawn: Callable[..., Any]) -> None:
    redis = spawn("redis")
    worker = spawn("worker", redis_url=redis.url, host="logcrash", concurrency=1,
                   env={"VMTASK_LEASE_SECONDS": "2"})
    with VirtualServer(redis.url, host="logcrash", poll_interval=0.5) as server:
        task = server.ping(duration_ms=60_000, steps=600)
        wait_until(lambda: len(task.log()) >= 3, 20, "steps logged")
        worker.kill()  # SIGKILL: nothing of the worker writes its end
        assert task.wait_for_completion(30_000)
        assert task.result is VMTaskResult.ThreadCrashError
        texts = [text for _when, text in parsed(task.log())]
    assert texts[0].startswith("started on worker logcrash:")
    assert texts[-1].startswith("crashed (its worker's lease expired): ThreadCrashError "
                                "0x80010105"), texts
    assert "The worker running the task stopped" in texts[-1]


def test_the_log_expires_with_the_record(spawn: Callable[..., Any]) -> None:
    redis = spawn("redis")
    spawn("worker", redis_url=redis.url, host="logttl", concurrency=1,
          env={"VMTASK_RETENTION_SECONDS": "3"})
    client = redis.client()
    with VirtualServer(redis.url, host="logttl") as server:
        task = server.ping(duration_ms=100, steps=2)
        done(task)
        assert len(task.log()) == 4
        record_ms = client.pttl(keys.task_record(task.id))
        log_ms = client.pttl(keys.task_log(task.id))
        # The end line gave the log the record's retention, in the same script.
        assert 0 < record_ms <= 3000 and abs(record_ms - log_ms) < 50, (record_ms, log_ms)
        wait_until(lambda: client.exists(keys.task_record(task.id)) == 0, 10, "record expiry")
        assert client.exists(keys.task_log(task.id)) == 0
        with pytest.raises(errors.TaskNotFoundError):
            task.log()


def test_the_log_is_capped_and_only_the_running_worker_writes(
        redis_server: RedisServer) -> None:
    client = redis_server.client()
    record, channel = keys.task_record("capped-log"), keys.task_channel("capped-log")
    client.delete(record, keys.task_log("capped-log"))
    client.hset(record, mapping={"state": "STARTED", "worker": "w1"})
    client.expire(record, 600)
    # Leased, or a reaper of the session's workers judges it crashed meanwhile.
    client.set(keys.task_lease("capped-log"), "w1", px=60_000)
    write = Scripts.of(client).task_log_write
    lines = [f"line {i}" for i in range(tasklog.MAX_LINES + 100)]
    assert write(record=record, channel=channel, worker="w1",
                 lines=[x for i, line in enumerate(lines) for x in (str(i), line)]) == 1
    server = VirtualServer(redis_server.url, host="alpha")
    try:
        every = server.get_task("capped-log").log()
        assert len(every) == tasklog.MAX_LINES
        assert every[0].endswith(" line 100") and every[-1].endswith(f" line {len(lines) - 1}")
        # Numbered over the whole life: what came after line 1095 (n = 1096) is the
        # last four, though the cap dropped the first hundred.
        number, after = server.store.log_entries("capped-log", after=1096)
        assert number == 1097
        assert [entry["m"] for entry in after] == [f"line {i}" for i in range(1096, 1100)]
        assert server.store.log_entries("capped-log", after=len(lines)) == (len(lines) + 1, [])
        number, kept = server.store.log_entries("capped-log", after=5)
        assert (number, len(kept)) == (101, tasklog.MAX_LINES)
        number, last_two = server.store.log_entries("capped-log", tail=2)
        assert number == len(lines) - 1 and len(last_two) == 2
        # Another worker (one judged crashed, then woken) adds nothing.
        assert write(record=record, channel=channel, worker="w2", lines=["1", "late"]) == 0
        assert server.get_task("capped-log").log(tail=1)[0].endswith(f" line {len(lines) - 1}")
    finally:
        server.close()
    assert abs(client.pttl(keys.task_log("capped-log")) - client.pttl(record)) < 50
    assert client.hget(record, "log_dropped") == "100"
    client.delete(record, keys.task_lease("capped-log"), keys.task_log("capped-log"))


def test_cli_task_log_follows_a_running_ping_until_it_ends(
        redis_server: RedisServer, server: VirtualServer) -> None:
    task = server.ping(duration_ms=3000, steps=6)
    wait_until(lambda: task.snapshot().state == "STARTED", 20, "start")
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "--url", redis_server.url, "task", "log", task.id,
         "-f"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
        cwd=REPO_ROOT, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    seen: list[tuple[str, bool]] = []  # each line, and whether the task had ended then
    try:
        for line in proc.stdout:
            seen.append((line.rstrip("\n"), task.snapshot().is_complete))
        code = proc.wait(timeout=30)
    finally:
        proc.kill()
    texts = [re.sub(STAMP, r"\2", line) for line, _ended in seen]
    assert code == 0, (texts, proc.stderr.read() if proc.stderr else "")
    assert texts[1:] == [f"step {i}/6" for i in range(1, 7)] + ["ended: Success"], texts
    assert texts[0].startswith("started on worker alpha:")
    # Followed live: the steps were printed while the task still ran.
    assert [ended for _line, ended in seen[1:4]] == [False, False, False], seen


@pytest.mark.slow
def test_no_secret_in_the_log_of_a_psk_transfer_with_a_redis_password(
        spawn: Callable[..., Any], tmp_path: Path) -> None:
    password = "redis-" + os.urandom(16).hex()
    redis = spawn("redis", password=password)
    psk_key = os.urandom(32).hex()
    psk = tmp_path / "psk"
    psk.mkdir()
    (psk / "keys.psk").write_text(f"qemu:{psk_key}\n")
    env = {"VMTASK_TRANSFER_PSK_DIR": str(psk)}
    source_worker = spawn("worker", redis_url=redis.url, host="logsrc", concurrency=2, env=env)
    spawn("worker", redis_url=redis.url, host="logdst", concurrency=2, env=env)
    with VirtualServer(redis.url, host="logsrc") as server:
        done(server.create_dynamic_virtual_hard_disk("d/x.qcow2", 8))
        task = server.get_hard_disk("d/x.qcow2").copy_to("logdst", "d/y.qcow2")
        done(task)
        assert source_worker.storage_root.joinpath("d", "x.qcow2").exists()
    client = redis.client()
    logs = {key: [tasklog.format_entry(tasklog.decode(raw)) for raw in client.lrange(key, 0, -1)]
            for key in client.scan_iter(match=keys.task_log("*"))}
    text = "\n".join(line for lines in logs.values() for line in lines)
    # The pull's qemu-img ran with the PSK credentials (by directory) and is logged...
    assert re.search(r"run: qemu-img convert --object tls-creds-psk,id=\S+,dir=" +
                     re.escape(str(psk)), text), text
    # ...but neither the key nor the Redis password is anywhere in any log.
    assert psk_key not in text and password not in text
    assert len(logs) >= 3  # the create, the copy and the source's serve task


@pytest.mark.slow
def test_a_vm_start_save_and_restore_log_qemu_and_qmp(
        vm_env: tuple[RedisServer, Path], vmhost: Any) -> None:
    with VirtualServer(vm_env[0].url, host="vmhost", poll_interval=0.5) as server:
        done(server.create_dynamic_virtual_hard_disk("logvm/disk.qcow2", 16))
        vm = server.create_virtual_machine("logvm", memory_mb=64, disks=["logvm/disk.qcow2"])
        try:
            start = vm.startup()
            done(start)
            save = vm.save()
            done(save)
            restore = vm.startup()
            done(restore)
            done(vm.turn_off())
        finally:
            done(vm.delete())
        texts = [text for _when, text in parsed(start.log())]
        order = [index_of(texts, r"^accelerator (tcg|kvm) \(VMTASK_ACCEL="),
                 index_of(texts, r"^launch: \S*qemu-system-x86_64 .*-mon chardev=qmp,mode=control"),
                 index_of(texts, r"^QEMU pid \d+ up; QMP query-status: running$"),
                 index_of(texts, r"^ended: Success$")]
        assert order == sorted(order), texts
        texts = [text for _when, text in parsed(save.log())]
        order = [index_of(texts, r"^QMP stop: the guest was running$"),
                 index_of(texts, r"^QMP migrate to \S+ \(max-bandwidth unlimited\)$"),
                 index_of(texts, r"^QMP query-migrate: completed, \d+ bytes written$"),
                 index_of(texts, r"^state published; QMP quit$"),
                 index_of(texts, r"^ended: Success$")]
        assert order == sorted(order), texts
        texts = [text for _when, text in parsed(restore.log())]
        assert index_of(texts, r"^restore from \S+saved\.state$") < index_of(
            texts, r"^launch: \S*qemu-system-x86_64 .*-incoming ")


def test_lines_written_while_redis_is_away_go_with_the_result(
        spawn: Callable[..., Any]) -> None:
    redis = spawn("redis", appendonly=True)
    spawn("worker", redis_url=redis.url, host="logaway", concurrency=1)
    with VirtualServer(redis.url, host="logaway", poll_interval=0.5) as server:
        task = server.ping(duration_ms=1500, steps=1)
        wait_until(lambda: task.snapshot().state == "STARTED", 20, "start")
        redis.stop()  # the step's progress, its line and the result all meet no Redis
        time.sleep(4.0)
        redis.start()
        assert task.wait_for_completion(60_000)
        assert task.result is VMTaskResult.Success
        texts = [text for _when, text in parsed(task.log())]
    order = [index_of(texts, r"^started on worker logaway:"),
             index_of(texts, r"^warning: could not record progress 99%"),
             index_of(texts, r"^step 1/1$"),
             index_of(texts, r"^retry: Redis unavailable while recording the result"),
             len(texts) - 1]
    assert order == sorted(order) and texts[-1] == "ended: Success", texts


def test_cli_task_log_tail_json_and_an_unknown_id(redis_server: RedisServer,
                                                  server: VirtualServer) -> None:
    task = server.ping(duration_ms=100, steps=3)
    done(task)
    base = [sys.executable, "-m", "api.cli", "--url", redis_server.url, "task", "log"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *args], capture_output=True, text=True, timeout=60,
                              env=cli_env(), cwd=REPO_ROOT, stdin=subprocess.DEVNULL)

    shown = run(task.id, "--tail", "2", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == task.log(tail=2)
    assert json.loads(shown.stdout)[-1].endswith(" ended: Success")
    plain = run(task.id)
    assert plain.returncode == 0 and plain.stdout.splitlines() == task.log()
    unknown = run("no-such-task")
    assert unknown.returncode == 4 and "no-such-task" in unknown.stderr, unknown


def test_a_long_failure_description_is_clipped_between_characters(
        redis_server: RedisServer) -> None:
    client = redis_server.client()
    task_id = "long-description"
    record = keys.task_record(task_id)
    client.hset(record, mapping={"state": "STARTED", "worker": "w1", "name": "vm.ping"})
    client.expire(record, 600)
    description = "x" + "é" * 1500  # two bytes a character, cut at an odd byte
    finish = Scripts.of(client).task_finish
    assert finish(record=record, lease=keys.task_lease(task_id), running=keys.RUNNING_TASKS,
                  channel=keys.task_channel(task_id), state="FAILURE", result=1,
                  error=0x80004005, description=description, finished=repr(time.time()),
                  percent=0, retention=60, task_id=task_id, only_if_lease_expired="0",
                  output="") == "OK"
    with VirtualServer(redis_server.url, host="alpha") as server:
        (line,) = server.get_task(task_id).log()
    assert line.endswith("é...") and len(line.encode()) < 1024 + 100, line
    assert client.hget(record, "error_description") == description  # the record keeps it all
    client.delete(record, keys.task_log(task_id))
