"""The compose stack under a real Docker engine, through the deployment page's own commands
(docs/operations/deployment.md).

A ``dockerd`` of the test's own (tests/deployment/docker_engine.py) builds the
images from stand-ins of the official ones (no registry is reachable here), then
the default stack runs as an operator would run it: ``scripts/make-secrets.sh``,
``docker-compose up -d --build``, the CLI on the Docker host.  What is checked,
in one test (the steps share one stack, and pytest-xdist may not split them):
everything healthy; the CLI; a disk convert; a VM that boots the tiny guest in a
worker container and answers through its agent; Flower's basic auth; a worker
container killed mid-task (the task ends ThreadCrashError); ``docker-compose
restart redis``, after which Redis starts again and the VM and the task records
are still there.

Root only (dockerd, debootstrap); slow.  The first run builds everything (about
a minute for the stand-ins, more for the worker image); the debootstrap tarball
and Docker's data root are kept in ``/var/cache/vmtask-deployment-test``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import tarfile
import urllib.error
import urllib.request
from typing import Any

import pytest

from api import VirtualServer, VMTaskResult, VMVMState
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

STORAGE_ROOT = "/var/lib/vmtask"


def task_of(stdout: str) -> dict[str, Any]:
    """The task in a --json answer (a task, a list of tasks, or {"task": ...})."""
    document = json.loads(stdout)
    if isinstance(document, list):
        document = document[0]
    if "task" in document and isinstance(document["task"], dict):
        document = document["task"]
    assert "id" in document, stdout
    return dict(document)


def ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def test_the_deployment_page_gives_the_commands_this_test_runs() -> None:
    readme = (REPO_ROOT / "docs" / "operations" / "deployment.md").read_text()
    for command in ("scripts/make-secrets.sh         # as root",
                    "docker compose up -d --build    # or: docker-compose up -d --build",
                    "export VMTASK_REDIS_URL=redis://producer@127.0.0.1:6380/0",
                    "export VMTASK_REDIS_PASSWORD_FILE=$PWD/secrets/redis_producer_password"):
        assert command in readme, command


def test_the_default_stack_as_the_deployment_page_runs_it(stack: Stack) -> None:
    # -- up, as the deployment page says (docker-compose v1 here) -------------------
    ok(stack.shell(["sh", "scripts/make-secrets.sh"]))
    ok(stack.compose("up", "-d", "--build", timeout=1500))
    stack.wait_healthy(("redis", "worker-a", "worker-b", "flower", "exporter"), 240)

    # -- the CLI on the Docker host -----------------------------------------------------
    hosts = ok(stack.vmtask("--json", "hosts"))
    assert {entry["host"] for entry in json.loads(hosts.stdout)} >= {"host-a", "host-b"}, \
        hosts.stdout

    # -- a disk convert in host-a's volume ------------------------------------------------
    created = ok(stack.vmtask("--host", "host-a", "--json", "disk", "create", "d.qcow2",
                              "--size-mb", "16"))
    converted = ok(stack.vmtask("--host", "host-a", "--json", "disk", "convert", "d.qcow2",
                                "d-fixed.vhd", "--type", "fixed"))
    info = ok(stack.vmtask("--host", "host-a", "--json", "disk", "info", "d-fixed.vhd"))
    assert json.loads(info.stdout)["size_in_guest"] == 16 * 1024 * 1024, info.stdout
    task_ids = [task_of(done.stdout)["id"] for done in (created, converted)]

    # -- a VM booting the tiny guest in worker-a, answering through its agent --------------
    boot = install_tiny_guest(stack, "worker-a")
    with VirtualServer(stack.producer_url(), host="host-a", poll_interval=0.5) as server:
        machine = server.create_virtual_machine(
            "tiny", memory_mb=128, kernel=boot["kernel"], initrd=boot["initrd"],
            append=boot["append"], guest_agent=True)
        start = machine.startup()
        assert start.wait_for_completion(180_000) and start.result == VMTaskResult.Success, \
            start.error_description
        # guest-get-osinfo answered by the agent inside the guest, through QEMU in the
        # worker container.
        wait_until(lambda: bool(machine.guest_os.os_name), 240,
                   "the tiny guest's agent to answer in the worker container", interval=2)
        shutdown = machine.guest_os.shutdown(180)
        assert shutdown.wait_for_completion(240_000), "shutdown through the agent"
        assert shutdown.result == VMTaskResult.Success, shutdown.error_description
        assert machine.state == VMVMState.TurnedOff
        task_ids += [start.id, shutdown.id]

    # -- Flower: 401 without the secret, 200 with it ---------------------------------------
    flower = f"http://127.0.0.1:{stack.flower_port}/"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(flower, timeout=30)
    assert refused.value.code == 401
    credentials = (stack.directory / "secrets" / "flower_basic_auth").read_text().strip()
    request = urllib.request.Request(flower, headers={
        "Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()})
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 200

    # -- a worker container killed mid-task: ThreadCrashError ------------------------------
    ping = ok(stack.vmtask("--host", "host-b", "--json", "ping", "--duration-ms", "600000",
                           "--steps", "600", "--no-wait"))
    crashed_id = task_of(ping.stdout)["id"]

    def running() -> bool:
        shown = task_of(ok(stack.vmtask("--json", "task", "show", crashed_id)).stdout)
        return int(shown["percent_completed"]) > 0

    wait_until(running, 120, "the ping to run on host-b", interval=1)
    stack.engine.docker("kill", stack.container("worker-b"))
    waited = stack.vmtask("--json", "task", "wait", crashed_id, timeout=180)
    assert waited.returncode == 10 + VMTaskResult.ThreadCrashError, \
        f"{waited.returncode}\n{waited.stdout}\n{waited.stderr}"
    # `docker kill` is not a crash to `restart: unless-stopped`: it stays down.
    assert stack.state("worker-b")["Status"] == "exited"
    task_ids.append(crashed_id)

    # -- the exporter, as its own Redis user: the convert and the crash are counted ---------
    def metrics() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{stack.exporter_port}/metrics",
                                    timeout=30) as answer:
            return str(answer.read().decode())

    scraped = metrics()
    assert "vmtask_up 1.0" in scraped, scraped[-2000:]
    counted = [line for line in scraped.splitlines()
               if line.startswith("vmtask_tasks_total{")]
    assert any('operation="vmtask.disk.convert"' in line and 'result="Success"' in line
               for line in counted), counted
    assert any('result="ThreadCrashError"' in line for line in counted), counted

    # -- Redis restarted: it starts again, and nothing it held is lost ---------------------
    before = {task_id: task_of(ok(stack.vmtask("--json", "task", "show", task_id)).stdout)
              for task_id in task_ids}
    ok(stack.compose("restart", "redis", timeout=120))
    try:
        stack.wait_healthy(("redis",), 60)
    except AssertionError as exc:
        raise AssertionError(f"Redis did not start again with its data: {exc}") from exc
    for task_id, record in before.items():
        shown = stack.vmtask("--json", "task", "show", task_id)
        assert shown.returncode == 0, f"task {task_id} lost with the restart: {shown.stderr}"
        after = task_of(shown.stdout)
        assert (after["result"], after["percent_completed"]) == \
            (record["result"], record["percent_completed"]), (record, after)
    machine_shown = stack.vmtask("--host", "host-a", "--json", "vm", "show", "tiny")
    assert machine_shown.returncode == 0, f"the VM is lost with the restart: {machine_shown}"
    assert json.loads(machine_shown.stdout)["state"] == "TurnedOff"
    redis_log = stack.logs("redis")
    assert "NOPERM" not in redis_log, redis_log


def install_tiny_guest(stack: Stack, service: str) -> dict[str, str]:
    """The tiny guest's kernel and initrd in the host's volume (guest/), as a user would
    copy them there; paths relative to the storage root."""
    from workers.devtools.tinyguest import build_tiny_guest

    guest = build_tiny_guest()
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        tar.add(guest.kernel, "guest/vmlinuz")
        tar.add(guest.initrd, "guest/initrd.gz")
    # Unpacked by the container's own user (vmtask), who then owns the files.
    unpacked = subprocess.run(
        ["/usr/bin/docker", "exec", "-i", stack.container(service), "tar", "-x", "-C",
         STORAGE_ROOT], input=archive.getvalue(), env=stack.engine.env, capture_output=True,
        timeout=120, check=False)
    assert unpacked.returncode == 0, unpacked.stderr
    return {"kernel": "guest/vmlinuz", "initrd": "guest/initrd.gz", "append": guest.append}
