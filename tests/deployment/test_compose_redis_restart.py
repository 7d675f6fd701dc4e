"""The compose Redis keeps what it was told across a restart, without Docker.

The compose redis command runs as a real ``redis-server`` (append-only file on)
with the ACL file scripts/make-secrets.sh renders.  Redis 7.0.15 (Debian
bookworm's, and the image tag the compose file pinned) replays its append-only
file at start as the ``default`` user: with ``user default off`` it refused every
MULTI/EXEC and every multi-write script it replayed (``-NOPERM ACLs rules changed
between the moment the transaction was accumulated and the EXEC call``), so every
restart silently lost the task records and VMs, which vmtask writes that way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis

from tests.deployment.compose_files import ComposeRedis


def test_transactions_and_scripts_survive_a_restart_of_the_compose_redis(
    compose: dict[str, Any], secrets_dir: Path, tmp_path: Path,
) -> None:
    server = ComposeRedis(compose, secrets_dir, tmp_path / "redis").start()
    try:
        password = (secrets_dir / "redis_worker_password").read_text().strip()
        worker = redis.Redis(host="127.0.0.1", port=server.port, username="worker",
                             password=password, socket_timeout=5, decode_responses=True)
        with worker.pipeline(transaction=True) as pipe:
            pipe.hset("vmtask:task:restart-test", mapping={"state": "Completed"})
            pipe.sadd("vmtask:vms", "restart-vm")
            pipe.execute()
        worker.eval("redis.call('SET', KEYS[1], ARGV[1]); redis.call('SET', KEYS[2], ARGV[1])",
                    2, "vmtask:vm:restart-vm", "vmtask:recent", "written")
        worker.close()
    finally:
        server.stop()
    server.start()
    try:
        admin = server.admin()
        assert admin.hgetall("vmtask:task:restart-test") == {"state": "Completed"}, server.log()
        assert admin.smembers("vmtask:vms") == {"restart-vm"}
        assert admin.get("vmtask:vm:restart-vm") == "written"
        assert admin.get("vmtask:recent") == "written"
        assert "NOPERM" not in server.log()
    finally:
        server.stop()


def test_nobody_logs_in_as_the_default_user(
    compose: dict[str, Any], secrets_dir: Path, tmp_path: Path,
) -> None:
    server = ComposeRedis(compose, secrets_dir, tmp_path / "redis").start()
    try:
        anonymous = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=5)
        try:
            anonymous.ping()
            raise AssertionError("a client without a user ran PING")
        except redis.AuthenticationError:
            pass
        for guess in ("", "default", "nopass", "redis"):
            guessed = redis.Redis(host="127.0.0.1", port=server.port, username="default",
                                  password=guess, socket_timeout=5)
            try:
                guessed.ping()
                raise AssertionError(f"the default user logged in with {guess!r}")
            except (redis.AuthenticationError, redis.ResponseError):
                pass
    finally:
        server.stop()


def test_producers_and_workers_may_ask_the_role_sentinel_clients_check(
    compose: dict[str, Any], secrets_dir: Path, tmp_path: Path,
) -> None:
    # redis-py's SentinelConnectionPool runs ROLE on every connection it makes, to
    # check it reached the primary: without +role (ROLE is @admin @dangerous) no
    # submit and no task start could run in the HA profile.
    server = ComposeRedis(compose, secrets_dir, tmp_path / "redis").start()
    try:
        for user in ("producer", "worker"):
            password = (secrets_dir / f"redis_{user}_password").read_text().strip()
            client = redis.Redis(host="127.0.0.1", port=server.port, username=user,
                                 password=password, socket_timeout=5, decode_responses=True)
            assert client.execute_command("ROLE")[0] == "master", user
            client.close()
    finally:
        server.stop()
