"""Least privilege in Redis: producers and workers as separate ACL users; no login as ``default``.

The users come from ``deploy/redis/users.acl.template``, the file the compose
deployment is made from (``scripts/make-secrets.sh``), with passwords of the test's
own.  A whole task runs through them; the producer user is refused what it does
not need.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from api import VirtualServer, VMTaskResult, errors
from workers.devtools.sandbox import REPO_ROOT, RedisServer, WorkerProcess

HOST = "aclhost"
TEMPLATE = REPO_ROOT / "deploy" / "redis" / "users.acl.template"
PASSWORDS = {user: secrets.token_hex(16)
             for user in ("producer", "worker", "exporter", "admin", "replicator", "sentinel")}


def write_acl_file(path: Path) -> Path:
    # Redis ACL files have no comments: the template's are for people.
    text = "".join(line + "\n" for line in TEMPLATE.read_text().splitlines()
                   if line.strip() and not line.startswith("#"))
    for user, password in PASSWORDS.items():
        digest = hashlib.sha256(password.encode()).hexdigest()
        text = text.replace(f"@{user.upper()}_SHA256@", digest)
    assert not re.search(r"@[A-Z_]+_SHA256@", text), "a user of the template has no password"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    root = tmp_path_factory.mktemp("acl")
    server = RedisServer(root / "redis", acl_file=write_acl_file(root / "users.acl"),
                         username="admin", password=PASSWORDS["admin"]).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def acl_worker(acl_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory,
               ) -> Iterator[WorkerProcess]:
    root = tmp_path_factory.mktemp("acl-worker")
    worker = WorkerProcess(acl_redis.url_for("worker", PASSWORDS["worker"]), HOST,
                           root / "storage", root).start()
    yield worker
    worker.stop()


def denied_commands(acl_redis: RedisServer) -> list[str]:
    entries = acl_redis.client().acl_log()
    return [f"{e['username']}: {e['reason']} {e['object']}" for e in entries]


def test_a_whole_task_runs_with_the_producer_and_worker_users(
    acl_redis: RedisServer, acl_worker: WorkerProcess,
) -> None:
    url = acl_redis.url_for("producer", PASSWORDS["producer"])
    with VirtualServer(url, host=HOST, poll_interval=0.5) as server:
        assert server.hosts == [HOST]
        ping = server.ping(duration_ms=200, steps=4)
        assert ping.wait_for_completion(30_000), denied_commands(acl_redis)
        assert ping.result == VMTaskResult.Success, ping.error_description
        create = server.create_dynamic_virtual_hard_disk("acl.qcow2", 16)
        assert create.wait_for_completion(60_000)
        assert create.result == VMTaskResult.Success, create.error_description
        disk = server.get_hard_disk("acl.qcow2")
        assert disk.size_in_guest == 16 * 1024 * 1024
        assert server.get_task(create.id).percent_completed == 100
        vm = server.create_virtual_machine("aclvm", memory_mb=64, disks=["acl.qcow2"])
        assert server.find_virtual_machine("aclvm") is not None
        delete = vm.delete()
        assert delete.wait_for_completion(30_000)
        assert delete.result == VMTaskResult.Success, delete.error_description
        assert server.find_virtual_machine("aclvm") is None
    assert denied_commands(acl_redis) == []
    assert "NOPERM" not in acl_worker.log() and "NoPermission" not in acl_worker.log()


def test_the_producer_user_gets_only_what_it_needs(
    acl_redis: RedisServer, acl_worker: WorkerProcess,
) -> None:
    producer = redis.Redis.from_url(acl_redis.url_for("producer", PASSWORDS["producer"]),
                                    socket_timeout=5)
    assert producer.ping()
    for refused in (producer.flushall, producer.flushdb, lambda: producer.keys("*"),
                    lambda: producer.config_get("*"),
                    lambda: producer.get("celery-task-meta-x"),  # Celery's results
                    lambda: producer.hgetall("unacked"),  # kombu's in-flight messages
                    lambda: producer.set(f"vmtask:host:{HOST}", "{}"),  # a forged presence
                    lambda: producer.lrange(f"host.{HOST}", 0, -1),  # reading others' messages
                    lambda: producer.get("anything-else")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            refused()
    worker = redis.Redis.from_url(acl_redis.url_for("worker", PASSWORDS["worker"]),
                                  socket_timeout=5)
    for refused in (worker.flushall, lambda: worker.keys("*"), lambda: worker.config_get("*")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            refused()


def test_the_producer_user_judges_a_crashed_task(acl_redis: RedisServer) -> None:
    """A read of a started task with no lease ends it ThreadCrashError; the judgment
    also notes which primary judged (INFO, vmtask:redis-primary): allowed."""
    producer_url = acl_redis.url_for("producer", PASSWORDS["producer"])
    orphan = "0f0f0f0f-0000-4000-8000-00000000acl1"
    writer = redis.Redis.from_url(producer_url, socket_timeout=5)
    writer.hset(f"vmtask:task:{orphan}", mapping={
        "name": "vmtask.ping", "description": "orphan", "host": HOST, "cancelable": "0",
        "state": "STARTED", "percent": "0", "created": "1", "started": "1"})
    writer.sadd("vmtask:running", orphan)
    with VirtualServer(producer_url, host=HOST) as producer:
        snap = producer.get_task(orphan).snapshot()
    assert snap.result is VMTaskResult.ThreadCrashError
    assert writer.hget(f"vmtask:task:{orphan}", "state") == b"FAILURE"


def test_the_default_user_is_disabled(acl_redis: RedisServer) -> None:
    anonymous = redis.Redis(host="127.0.0.1", port=acl_redis.port, socket_timeout=5)
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.get("vmtask:hosts")
    with pytest.raises(errors.BrokerUnavailableError):
        VirtualServer(acl_redis.url_for("producer", "wrong-password"), host=HOST).hosts  # noqa: B018


def test_a_refused_command_is_a_broker_error_not_a_redis_one(acl_redis: RedisServer) -> None:
    """A producer whose user lacks a permission gets BrokerUnavailableError (ACL)."""
    admin = acl_redis.client()
    admin.acl_setuser("narrow", enabled=True, passwords=["+narrow-pass"],
                      commands=["+ping"], keys=["vmtask:*"], reset=True)
    with pytest.raises(errors.BrokerUnavailableError, match="ACL"):
        VirtualServer(acl_redis.url_for("narrow", "narrow-pass"), host=HOST).hosts  # noqa: B018


def judge_an_orphan(url: str, orphan: str, writer: redis.Redis) -> VMTaskResult | None:
    writer.hset(f"vmtask:task:{orphan}", mapping={
        "name": "tests.orphan", "description": "orphan", "host": HOST, "cancelable": "0",
        "state": "STARTED", "percent": "0", "created": "1", "started": "2"})
    writer.sadd("vmtask:running", orphan)
    with VirtualServer(url, host=HOST) as producer:
        return producer.get_task(orphan).snapshot().result


def test_a_judgment_is_counted_and_a_user_without_the_metrics_key_still_judges(
    acl_redis: RedisServer,
) -> None:
    """The producer counts what it ends into vmtask:metrics; a user whose ACL predates
    the metrics (no ~vmtask:metrics) still ends the task, only uncounted (pcall)."""
    admin = acl_redis.client()
    field = f"total\ttests.orphan\t{HOST}\t{int(VMTaskResult.ThreadCrashError)}"
    before = int(admin.hget("vmtask:metrics", field) or 0)
    producer_url = acl_redis.url_for("producer", PASSWORDS["producer"])
    writer = redis.Redis.from_url(producer_url, socket_timeout=5)
    assert judge_an_orphan(producer_url, "0f0f0f0f-0000-4000-8000-00000000acl2", writer) \
        is VMTaskResult.ThreadCrashError
    assert int(admin.hget("vmtask:metrics", field) or 0) == before + 1
    # The producer's rules without the metrics key, as in an ACL file made before it.
    rules = next(rule for rule in admin.acl_list() if rule.split()[1] == "producer")
    old_rules = [r for r in rules.split()[2:] if r != "~vmtask:metrics" and not r.startswith("#")]
    admin.acl_setuser("oldproducer", reset=True, enabled=True, passwords=["+old-pass"])
    admin.execute_command("ACL", "SETUSER", "oldproducer", *old_rules)
    old_url = acl_redis.url_for("oldproducer", "old-pass")
    old_writer = redis.Redis.from_url(old_url, socket_timeout=5)
    orphan = "0f0f0f0f-0000-4000-8000-00000000acl3"
    assert judge_an_orphan(old_url, orphan, old_writer) is VMTaskResult.ThreadCrashError
    assert old_writer.hget(f"vmtask:task:{orphan}", "state") == b"FAILURE"
    assert int(admin.hget("vmtask:metrics", field) or 0) == before + 1
    admin.acl_deluser("oldproducer")


def test_the_exporter_user_reads_the_metrics_and_nothing_else(
    acl_redis: RedisServer, acl_worker: WorkerProcess,
) -> None:
    from prometheus_client import generate_latest

    from api.exporter import registry_for
    from api.store import connect

    url = acl_redis.url_for("exporter", PASSWORDS["exporter"])
    admin = acl_redis.client()
    admin.acl_log_reset()
    text = generate_latest(registry_for(connect(url))).decode()
    assert "vmtask_up 1.0" in text
    assert f'vmtask_host_up{{host="{HOST}"}} 1.0' in text
    assert denied_commands(acl_redis) == []
    exporter = redis.Redis.from_url(url, socket_timeout=5)
    for refused in (lambda: exporter.lrange(f"host.{HOST}", 0, -1),  # a message's contents
                    lambda: exporter.lpop(f"host.{HOST}"),
                    lambda: exporter.hincrby("vmtask:metrics", "forged", 1),
                    lambda: exporter.hgetall("unacked"),
                    lambda: exporter.get("celery-task-meta-x"),
                    lambda: exporter.evalsha("0" * 40, 0),
                    lambda: exporter.keys("*")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            refused()
