"""Host evacuation, the first composite task: real workers for three hosts, tiny
guests under TCG, the existing live and cold moves as children.

alpha and beta move live at 8 MiB/s (slow enough to cancel or kill mid-way);
gamma at full speed.  One module: the guests are booted once and moved around.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from api import VirtualMachine, VirtualServer, VMTaskResult, VMVMState, errors
from api.celery_backend import PROGRESS
from api.protocol import hresults, keys, tasks
from api.protocol.records import STARTED
from tests.cli_runs import PtyProcess, run_cli
from tests.guests import add_guest, agent, boot_id, stop_all
from tests.helpers import assert_succeeded as done
from tests.helpers import pids_of, qemu_io
from workers.devtools.sandbox import RedisServer, WorkerProcess, wait_until
from workers.engines.guest_agent import GuestAgentClient
from workers.failures import OperationFailed

# One xdist process runs the module in order: its hosts and booted guests are built once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("evacuation")]
S = VMVMState
FAST = {"VMTASK_HEARTBEAT_SECONDS": "1", "VMTASK_LEASE_SECONDS": "3"}
SLOW = {**FAST, "VMTASK_MIGRATE_MAX_BANDWIDTH": str(8 << 20)}
HOSTS = ("alpha", "beta", "gamma")
RUNNING = ("ev-run1", "ev-run2")
OFF = ("ev-off1", "ev-off2")
DATA_MB = 40


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(tmp_path_factory.mktemp("ev"))


@pytest.fixture(scope="module")
def redis_url(base: Path) -> Iterator[str]:
    redis = RedisServer(base / "redis").start()
    yield redis.url
    redis.stop()


@pytest.fixture(scope="module")
def hosts(redis_url: str, base: Path) -> Iterator[dict[str, WorkerProcess]]:
    started = {name: WorkerProcess(redis_url, name, base / name[0], base, concurrency=2,
                                   env=FAST if name == "gamma" else SLOW).start(wait=False)
               for name in HOSTS}
    for worker in started.values():
        add_guest(worker.storage_root)
        worker.wait_ready()
    yield started
    for worker in started.values():
        worker.kill()  # nothing left to finish cleanly, and a graceful stop costs seconds
    stop_all(*started.values())


@pytest.fixture(scope="module")
def server(redis_url: str, hosts: dict[str, WorkerProcess]) -> Iterator[VirtualServer]:
    with VirtualServer(redis_url, host="alpha", poll_interval=0.2) as vs:
        wait_until(lambda: set(vs.hosts) == set(HOSTS), 30, "three live hosts")
        yield vs


@pytest.fixture(scope="module")
def guests(server: VirtualServer, hosts: dict[str, WorkerProcess]) -> dict[str, str]:
    """Two running tiny guests and two turned off ones on alpha; their boot ids."""
    root = hosts["alpha"].storage_root
    for name in RUNNING + OFF:
        done(server.create_dynamic_virtual_hard_disk(f"{name}/d.qcow2", 64, host="alpha"))
        if name in RUNNING:  # data to mirror: a live move off alpha or beta takes seconds
            qemu_io(root / name / "d.qcow2", "qcow2", f"write -P 0x5a 1M {DATA_MB}M")
        server.create_virtual_machine(
            name, memory_mb=96, disks=[f"{name}/d.qcow2"], guest_agent=name in RUNNING,
            network=None, host="alpha", kernel="guest/vmlinuz", initrd="guest/initrd.gz",
            append="console=ttyS0 quiet panic=-1")
    tasks = [vm.startup() for vm in map(server.find_virtual_machine, RUNNING) if vm]
    for task in tasks:
        done(task)
    booted: dict[str, str] = {}
    for name in RUNNING:
        wait_until(lambda name=name: answers(agent(root, name)), 90, f"the agent of {name}",
                   interval=0.5)
        booted[name] = boot_id(root, name)
    return booted


def answers(client: GuestAgentClient) -> bool:
    try:
        with client:
            return client.ping(timeout=2)
    except (OperationFailed, OSError):
        return False


def vm(server: VirtualServer, name: str) -> VirtualMachine:
    found = server.find_virtual_machine(name)
    assert found is not None
    return found


def where_it_runs(hosts: dict[str, WorkerProcess], name: str) -> tuple[list[str], list[str]]:
    """The hosts with a QEMU process of the VM (/proc), and those whose guest agent
    answers (only a running guest's does: a receiving QEMU's guest is stopped)."""
    processes = [h for h, w in hosts.items() if pids_of(f"{w.storage_root}/vms/{name}/")]
    agents = [h for h in processes if answers(agent(hosts[h].storage_root, name))]
    return processes, agents


class Sampler:
    """Samples, until stopped, where each running guest runs: never on no host,
    never answering on two.  One sample pings the hosts one after the other, so a
    switch-over between two pings reads as both (or, in its pause, as none): such a
    sample is taken again at once, and only two in a row are a failure (a guest
    that really ran twice, or nowhere, stays so)."""

    def __init__(self, hosts: dict[str, WorkerProcess], names: tuple[str, ...]) -> None:
        self.hosts, self.names = hosts, names
        self.samples = 0
        self.bad: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        while not self.stop.is_set():
            for name in self.names:
                processes, agents = where_it_runs(self.hosts, name)
                if len(agents) != 1:
                    processes, agents = where_it_runs(self.hosts, name)
                if not processes or len(agents) != 1:
                    self.bad.append(f"{name}: processes on {processes}, agent on {agents}")
                self.samples += 1
            self.stop.wait(0.1)  # the moves share the machine's two cores with this

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(60)


def test_ctrl_c_cancels_the_whole_and_the_cancel_cascades(
        server: VirtualServer, hosts: dict[str, WorkerProcess], guests: dict[str, str]) -> None:
    cli = PtyProcess(["--url", server.url, "hosts", "evacuate", "alpha", "--to", "beta",
                      "--parallel", "1"])
    try:
        task = server.get_task(cli.expect(rb"task ([0-9a-f-]{36})").group(1).decode())
        assert task.is_cancelable
        # Names in order: the two cold moves, then ev-run1's live one (40 MB at 8 MiB/s).
        wait_until(lambda: any(c.snapshot().percent_completed >= 3 and "live" in c.description
                               for c in task.children), 60, "the first live move under way")
        cli.expect(rb"Migrating VM ev-run1 live")  # the child's own line
        started = list(task.children)
        cli.proc.send_signal(signal.SIGINT)
        cli.expect(rb"Cancel task [0-9a-f-]{36} \(Evacuating host alpha\)\? \[Y/n\]")
        cli.send(b"y\n")
        cancelled_at = time.monotonic()
        assert cli.finish() == 11, cli.text()  # Cancelled
    finally:
        cli.close()
    snap = task.snapshot()
    assert snap.result is VMTaskResult.Cancelled, snap.error_description
    assert task.children == started  # none started after the cancel
    assert len(started) == 3  # --parallel 1: ev-off1, ev-off2, then ev-run1
    for child in started:
        assert child.snapshot().parent == task.id and child.parent == task
    results = [child.snapshot().result for child in started]
    assert results == [VMTaskResult.Success, VMTaskResult.Success, VMTaskResult.Cancelled]
    assert snap.output["moved"] == {"ev-off1": "beta", "ev-off2": "beta"}
    assert set(snap.output["failed"]) == {"ev-run1", "ev-run2"}
    assert "cancelled first" in snap.output["failed"]["ev-run2"]
    assert time.monotonic() - cancelled_at < 30
    moved = snap.output["moved"]
    assert set(snap.output["failed"]) | set(moved) == set(RUNNING + OFF)
    for name in RUNNING:
        assert vm(server, name).state is S.Running
        host = vm(server, name).host
        assert host == moved.get(name, "alpha")
        assert boot_id(hosts[host].storage_root, name) == guests[name]
    assert server.host_status()["alpha"]["maintenance"] is True
    log = "\n".join(task.log())
    assert "cancel" in log and "destination" in log


def test_evacuation_moves_every_vm_each_running_exactly_once(
        server: VirtualServer, hosts: dict[str, WorkerProcess], guests: dict[str, str]) -> None:
    for name in RUNNING:
        assert answers(agent(hosts[vm(server, name).host].storage_root, name))
    percents: list[int] = []
    progress_seen = set()
    most_at_once = 0
    with Sampler(hosts, RUNNING) as sampler:
        task = server.evacuate_host("alpha", max_parallel=2)
        while not task.is_complete:
            percents.append(task.percent_completed)
            most_at_once = max(most_at_once, sum(
                1 for s in server.task_snapshots([c.id for c in task.children])
                if s is not None and s.state == STARTED))
            progress_seen.add(server.celery.AsyncResult(task.id).state)
            time.sleep(0.1)
    assert task.result is VMTaskResult.Success, task.error_description
    assert sampler.samples > 4 and sampler.bad == []
    output = task.snapshot().output
    assert output["failed"] == {}
    assert set(output["moved"]) <= set(RUNNING + OFF)
    assert percents == sorted(percents) and task.percent_completed == 100
    assert PROGRESS in progress_seen
    assert most_at_once <= 2
    assert server.host_status()["alpha"]["maintenance"] is True
    assert server.redis.smembers(keys.host_vms("alpha")) == set()
    for name in RUNNING + OFF:
        machine = vm(server, name)
        assert machine.host in ("beta", "gamma")
        assert machine.state is (S.Running if name in RUNNING else S.TurnedOff)
    for name in RUNNING:
        host = vm(server, name).host
        assert boot_id(hosts[host].storage_root, name) == guests[name]  # the same boot
        assert not pids_of(f"{hosts['alpha'].storage_root}/vms/{name}/")
    shown = run_cli("--url", server.url, "task", "show", task.id)
    assert shown.code == 0 and "children" in shown.out


def test_the_refusals_before_queueing(server: VirtualServer, hosts: dict[str, WorkerProcess],
                                      guests: dict[str, str]) -> None:
    with pytest.raises(errors.InvalidArgumentError):
        server.evacuate_host("alpha", destinations=["alpha"])
    with pytest.raises(errors.InvalidArgumentError):
        server.evacuate_host("alpha", max_parallel=0)
    with pytest.raises(errors.HostUnavailableError):
        server.evacuate_host("alpha", destinations=["nosuch"])
    # A move onto a host in maintenance, wherever the earlier tests left the VM.
    moving = vm(server, OFF[0])
    target = next(h for h in HOSTS if h != moving.host)
    held = server.host_status()[target]["maintenance"]
    server.set_maintenance(target, True)
    try:
        with pytest.raises(errors.HostUnavailableError, match="maintenance"):
            moving.migrate(target)
    finally:
        server.set_maintenance(target, held)


def test_kill_9_of_the_driving_worker_ends_it_and_its_children(
        server: VirtualServer, hosts: dict[str, WorkerProcess], guests: dict[str, str]) -> None:
    # Everything back onto beta, which moves live at 8 MiB/s, then evacuate it to alpha.
    server.set_maintenance("alpha", False)
    for name in RUNNING + OFF:
        if vm(server, name).host != "beta":
            done(vm(server, name).migrate("beta"))
    task = server.evacuate_host("beta", destinations=["alpha"], max_parallel=2)
    wait_until(lambda: any(c.snapshot().percent_completed >= 1 and "live" in c.description
                           for c in task.children), 60, "a live move under way")
    holder = server.redis.hget(keys.task_record(task.id), "worker")
    pid = int(str(holder).rsplit(":", 1)[1])
    running = [c for c in task.children if not c.is_complete]
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    assert running, "every move ended before the kill: nothing was left to cascade to"
    assert task.wait_for_completion(30_000)
    snap = task.snapshot()
    assert snap.result is VMTaskResult.ThreadCrashError and snap.error == hresults.SERVER_FAULT
    assert time.monotonic() - killed_at < 15  # the lease (3 s) and a beat or two
    for child in task.children:
        assert child.wait_for_completion(60_000), "a child runs on unowned"
        assert child.result in (VMTaskResult.Cancelled, VMTaskResult.Success)
    # The live moves (40 MB at 8 MiB/s) outlast the lease: the judge's cascade stops them.
    ended = [c.snapshot() for c in running]
    assert any(e.result is VMTaskResult.Cancelled and e.cancel_requested for e in ended), ended
    for name in RUNNING:
        processes, agents = where_it_runs(hosts, name)
        assert len(agents) == 1 and processes == agents, (name, processes, agents)
        assert boot_id(hosts[agents[0]].storage_root, name) == guests[name]


def test_children_carry_celerys_parent_and_root_ids(redis_url: str) -> None:
    """What Flower draws its tree from: the message's parent_id and root_id headers."""
    import json

    from api.submitting import ParentLink

    with VirtualServer(redis_url, poll_interval=0.2) as linked:
        linked.redis.set(keys.host_heartbeat("phantom"), "{}", ex=30)
        linked.parent_link = ParentLink("the-parent", "the-root")
        linked.announce_child("child-1")
        task = linked.submit(tasks.PING, description="a child", kwargs={}, host="phantom",
                             task_id="child-1")
        raw = linked.redis.lrange(keys.host_queue("phantom"), 0, -1)
        linked.redis.delete(keys.host_queue("phantom"), keys.host_heartbeat("phantom"))
        assert task.snapshot().parent == "the-parent"
        assert json.loads(linked.redis.hget(keys.task_record("the-parent"), "children") or
                          "[]") == ["child-1"]
    headers = json.loads(raw[0])["headers"]
    assert (headers["parent_id"], headers["root_id"]) == ("the-parent", "the-root")


def test_a_vm_that_cannot_move_is_reported_and_stays(
        server: VirtualServer, hosts: dict[str, WorkerProcess]) -> None:
    """Moves refuse a linked clone and the VM it rests on (the clone's layers stay on
    its source's host): both stay on the host, in ``failed``, and the evacuation ends
    with the first refusal, naming its VM."""
    server.set_maintenance("alpha", False)
    # Only this test's VMs on gamma: the other tests' guests may have been left there
    # (evacuated to the least loaded host), whichever of them ran before this one.
    for name in RUNNING + OFF:
        found = server.find_virtual_machine(name)
        if found is not None and found.host == "gamma":
            done(found.migrate("alpha"))
    done(server.create_dynamic_virtual_hard_disk("ev-base/d.qcow2", 16, host="gamma"))
    base = server.create_virtual_machine("ev-base", memory_mb=64, disks=["ev-base/d.qcow2"],
                                         network=None, host="gamma")
    done(base.create_snapshot("s1", include_memory=False))
    done(base.clone("ev-lc", linked=True, snapshot="s1"))
    done(server.create_dynamic_virtual_hard_disk("ev-free/d.qcow2", 16, host="gamma"))
    server.create_virtual_machine("ev-free", memory_mb=64, disks=["ev-free/d.qcow2"],
                                  network=None, host="gamma")
    task = server.evacuate_host("gamma", destinations=["alpha"])
    assert task.wait_for_completion(120_000)
    snap = task.snapshot()
    assert snap.result is not VMTaskResult.Success
    assert snap.error == hresults.INVALID_STATE
    assert snap.error_description.startswith("ev-base: ")  # the first refused, by name
    assert snap.output["moved"] == {"ev-free": "alpha"}
    assert sorted(snap.output["failed"]) == ["ev-base", "ev-lc"]
    for name in ("ev-base", "ev-lc"):
        assert snap.output["failed"][name].startswith(
            hresults.format_hresult(hresults.INVALID_STATE))
        assert vm(server, name).host == "gamma"
    assert (hosts["gamma"].storage_root / "ev-base" / "d.qcow2").exists()
    assert "ev-lc: destination alpha skipped" in "\n".join(task.log())
