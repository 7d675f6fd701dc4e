"""The compose HA profile under a real Docker engine, through the deployment page's
commands (docs/operations/deployment.md).

The profile is started by the deployment page's command (which names
``redis-replica``: without it the sentinels saw no replica and no failover could
happen).  The sentinels must see the replica; a task runs through the CLI in a
container with the compose environment (the deployment page's HA producer recipe);
then two failovers, the old primary rejoining between them (the second one used to
leave no primary: the sentinels held the old primary by name and by IP), each
spanned by a task that must end Success exactly once.  Needs root (dockerd); slow.
"""

from __future__ import annotations

import json
import os
import re
from functools import partial
from typing import Any

import pytest

from tests.deployment.stack import Stack
from workers.devtools.sandbox import REPO_ROOT, wait_until

pytestmark = [
    pytest.mark.slow,
    # One pytest-xdist worker runs every test of the real engine (scripts/test.sh
    # passes --dist loadgroup): they share one dockerd, and no worker sits waiting
    # for the other's engine to let go of the cache.
    pytest.mark.xdist_group("docker-engine"),
    pytest.mark.skipif(os.geteuid() != 0,
                       reason="runs its own dockerd and debootstrap, which need root"),
]

HA_UP = ["--profile", "ha", "up", "-d", "--build", "redis-replica", "worker-a-ha",
         "worker-b-ha", "flower-ha"]
HA_HEALTHY = ("redis-primary", "redis-replica", "sentinel-1", "sentinel-2", "sentinel-3",
              "worker-a-ha", "worker-b-ha")
# The deployment page's HA producer: the CLI in a worker container, on the compose network.
# The URL names the master itself (?master_name=), which the CLI also accepts
# while it ignores VMTASK_REDIS_SENTINEL_MASTER (issue 20, item 6).
HA_URL = ("sentinel://worker@sentinel-1:26379/0?master_name=vmtask;"
          "sentinel://sentinel-2:26379;sentinel://sentinel-3:26379")
PRODUCER = ["run", "--rm", "--no-deps", "-T", "-e", f"VMTASK_REDIS_URL={HA_URL}",
            "worker-a-ha", "vmtask"]


def sentinel(stack: Stack, *command: str, node: str = "sentinel-1") -> list[str]:
    done = stack.compose("exec", "-T", node, "redis-cli", "-p", "26379", *command, timeout=60,
                         check=False)
    return done.stdout.split() if done.returncode == 0 else []


def master_view(stack: Stack, node: str = "sentinel-1") -> dict[str, str]:
    flat = sentinel(stack, "sentinel", "master", "vmtask", node=node)
    return dict(zip(flat[::2], flat[1::2], strict=False))


def replication(stack: Stack, node: str) -> dict[str, str]:
    done = stack.compose("exec", "-T", node, "sh", "-c",
                         'REDISCLI_AUTH="$(cat /run/secrets/redis_admin_password)" '
                         "redis-cli --user admin info replication", timeout=60, check=False)
    return dict(line.strip().split(":", 1) for line in done.stdout.splitlines()
                if ":" in line)


def promoted(stack: Stack, node: str) -> bool:
    """``node`` is the primary, and every sentinel names it (by name or address)."""
    if replication(stack, node).get("role") != "master":
        return False
    inspected = json.loads(stack.engine.docker("inspect", stack.container(node)).stdout)[0]
    names = {node} | {network["IPAddress"]
                      for network in inspected["NetworkSettings"]["Networks"].values()}
    return all(sentinel(stack, "sentinel", "get-master-addr-by-name", "vmtask",
                        node=watcher)[:1] in ([name] for name in names)
               for watcher in ("sentinel-1", "sentinel-2", "sentinel-3"))


def has_started(stack: Stack, task_id: str) -> bool:
    return int(cli(stack, "--json", "task", "show", task_id)["percent_completed"]) > 0


def rejoined(stack: Stack, node: str) -> bool:
    return replication(stack, node).get("master_link_status") == "up"


def cli(stack: Stack, *args: str, timeout: float = 300) -> dict[str, Any]:
    done = stack.compose(*PRODUCER, *args, timeout=timeout, check=False)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    document = json.loads(done.stdout)
    if isinstance(document, list):
        document = document[0]
    return dict(document.get("task", document))


def test_the_deployment_page_gives_the_commands_this_test_runs() -> None:
    readme = (REPO_ROOT / "docs" / "operations" / "deployment.md").read_text()
    assert " ".join(["docker-compose", *HA_UP]) in readme
    assert " ".join(["docker", "compose", *HA_UP]) in readme
    assert f"-e 'VMTASK_REDIS_URL={HA_URL}'" in readme
    assert "docker compose --profile ha run --rm --no-deps -T" in readme


def test_the_ha_profile_fails_over_twice_with_tasks_spanning_each(stack: Stack) -> None:
    assert stack.shell(["sh", "scripts/make-secrets.sh"]).returncode == 0
    stack.compose(*HA_UP, timeout=1500)
    stack.global_args = ["--profile", "ha"]
    stack.wait_healthy(HA_HEALTHY, 240)

    def sees_everyone() -> bool:
        views = [master_view(stack, node) for node in ("sentinel-1", "sentinel-2",
                                                         "sentinel-3")]
        return all(v.get("num-slaves") == "1" and v.get("num-other-sentinels") == "2"
                   for v in views)

    wait_until(sees_everyone, 90, "the sentinels to see the replica and each other",
               interval=1)

    first = cli(stack, "--host", "host-a", "--json", "ping", "--duration-ms", "300")
    assert first["result"] == "Success", first

    primary, replica = "redis-primary", "redis-replica"
    for round_number, host in ((1, "host-a"), (2, "host-b")):
        task = cli(stack, "--host", host, "--json", "ping", "--duration-ms", "40000",
                   "--steps", "40", "--no-wait")
        wait_until(partial(has_started, stack, task["id"]), 120,
                   f"round {round_number}: the ping to run", interval=1)
        stack.compose("kill", primary, timeout=60)
        wait_until(partial(promoted, stack, replica), 90,
                   f"round {round_number}: the sentinels to promote {replica}", interval=1)
        # The old primary comes back and rejoins as a replica of the new one.
        stack.compose("start", primary, timeout=60)
        wait_until(partial(rejoined, stack, primary), 120,
                   f"round {round_number}: {primary} to rejoin", interval=1)
        ended = cli(stack, "--json", "task", "wait", task["id"], timeout=300)
        assert ended["result"] == "Success", ended
        logs = stack.compose("logs", "--no-color", "worker-a-ha", "worker-b-ha").stdout
        runs = re.findall(rf"vmtask\.ping\[{re.escape(task['id'])}\] succeeded", logs)
        assert len(runs) == 1, f"round {round_number}: ran {len(runs)} times"
        primary, replica = replica, primary
    views = [master_view(stack, node) for node in ("sentinel-1", "sentinel-2", "sentinel-3")]
    assert all(v.get("name") == "vmtask" and v.get("ip") == "redis-primary" for v in views), \
        views
