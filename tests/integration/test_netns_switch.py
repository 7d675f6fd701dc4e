"""Network faults at a live migration's switch-over, each host in its own network
namespace (`tests.netns`): after the source has signalled the switch-over, while the
destination has not yet moved the record (``vm_move.lua``) or not yet run the guest
(``cont``).

The destination's worker is held before one QMP command (`tests.pause_points`), the
fault is made, then it is let go: each fault lands at the step the test means.  At
every step at most one QEMU runs the guest (a paused guest's agent cannot answer),
and at the end exactly one does, where the record says.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from api import VirtualMachine, VirtualServer, VMTask, VMTaskResult, VMVMState
from api.protocol import hresults, keys
from tests.guests import agent, boot_id
from tests.helpers import assert_succeeded as done
from tests.helpers import pids_of
from tests.netns import Network, wait_live
from tests.netns_helpers import FAST, LEASE, connect, nothing_of, root, running_guest, where
from tests.pause_points import PAUSING, pause_env
from workers.devtools.sandbox import wait_until
from workers.devtools.tinyguest import build_tiny_guest
from workers.engines import qemu_vm
from workers.engines.qemu_vm import Monitor
from workers.failures import OperationFailed

pytestmark = pytest.mark.slow
S = VMVMState


def hosts(net: Network, pause_b_before: str) -> Path:
    """Hosts a and b, b's worker held before its first QMP ``pause_b_before``: the
    marker that holds it (remove it to let b go)."""
    guest = build_tiny_guest()
    marker = net.directory / "b.paused"
    for name in ("a", "b"):
        net.add_host(name)
    net.start_worker("a", env=FAST)
    net.start_worker("b", env={**FAST, **pause_env(pause_b_before, marker)}, include=PAUSING)
    for name in ("a", "b"):
        (root(net, name) / "guest").mkdir(parents=True, exist_ok=True)
        shutil.copy(guest.kernel, root(net, name) / "guest" / "vmlinuz")
        shutil.copy(guest.initrd, root(net, name) / "guest" / "initrd.gz")
    return marker


def answers(net: Network, host: str, name: str) -> bool:
    """Whether the guest answers through ``host``'s QEMU: only a running guest can."""
    if not (root(net, host) / "vms" / name / "qga.sock").exists():
        return False
    with agent(root(net, host), name) as client:
        try:
            return client.ping(timeout=3)
        except OperationFailed:
            return False


def at_most_one(net: Network, name: str) -> list[str]:
    """The hosts whose QEMU runs the guest, asserted to be one at most."""
    running = [host for host in ("a", "b") if answers(net, host, name)]
    assert len(running) <= 1, f"the guest runs on {running}"
    return running


def statuses(net: Network, name: str) -> dict[str, str]:
    """Each host's QEMU of the VM and its run state, asked over QMP (once no task
    holds the monitor)."""
    found = {}
    for host in ("a", "b"):
        if pids_of(f"{root(net, host)}/vms/{name}/"):
            with Monitor(qemu_vm.VMPaths(root(net, host) / "vms" / name)) as monitor:
                found[host] = monitor.execute("query-status")["status"]
    return found


def migrate_to_the_switch_over(server: VirtualServer, net: Network, vm: VirtualMachine,
                               marker: Path) -> tuple[VMTask, VMTask]:
    """Migrate until b is held at its pause point, the switch-over signalled: the
    source's task and the destination's."""
    task = vm.migrate("b")
    arguments = json.loads(server.redis.hget(keys.task_record(task.id), "arguments"))
    wait_until(marker.exists, 120, "b to reach its pause point")
    assert server.redis.hget(keys.transfer(arguments["transfer_id"]), "switch") == "1"
    return task, server.get_task(arguments["peer_task_id"])


def ends_on_b(server: VirtualServer, net: Network, vm: VirtualMachine, before: str) -> None:
    """Exactly one QEMU, b's, runs the guest, the same boot; the record names b; a
    holds nothing of the VM."""
    wait_until(lambda: nothing_of(net, "a", vm.name) == [], 60, "a to remove its copies")
    assert statuses(net, vm.name) == {"b": "running"}
    assert where(vm) == ("b", S.Running)
    assert boot_id(root(net, "b"), vm.name) == before
    assert int(vm.details["pid"]) in pids_of(f"{root(net, 'b')}/vms/{vm.name}/")
    assert not server.redis.keys(keys.transfer("*"))


def test_a_source_cut_off_right_after_the_switch_over_signal(network: Network) -> None:
    """a signals the switch-over and loses its cable (Redis and b) before b moves the
    record: b's compare-and-set wins (a cannot reach Redis to take the guest back),
    b runs the guest and the record names b; a's QEMU, stopped by the completed
    migration, never runs it again; once a's link returns, a's task fences, finds
    the VM moved and removes its QEMU and copies."""
    net = network
    marker = hosts(net, "nbd-server-stop")
    with connect(net) as server:
        vm = running_guest(server, net, "sw1", data_mb=4)
        before = boot_id(root(net, "a"), "sw1")
        task, into = migrate_to_the_switch_over(server, net, vm, marker)
        assert at_most_one(net, "sw1") == []  # both stopped at the switch-over
        net.cut("a")
        cut_at = time.monotonic()
        marker.unlink()
        done(into)
        assert server.redis.hget(keys.vm_record("sw1"), "host") == "b"
        assert at_most_one(net, "sw1") == ["b"]
        assert boot_id(root(net, "b"), "sw1") == before
        assert pids_of(f"{root(net, 'a')}/vms/sw1/")  # a's stopped QEMU, cut off
        assert task.wait_for_completion(int((LEASE + 30) * 1000)), "the migration hangs"
        print(f"\na cut after the switch-over signal: {task.result!r} after "
              f"{time.monotonic() - cut_at:.1f} s: {task.error_description}")
        assert (task.result, task.error) == (VMTaskResult.ThreadCrashError,
                                             hresults.SERVER_FAULT), task.error_description
        assert where(vm) == ("b", S.Running)  # b vouches for it, a being gone
        # The cut lasts until a's task has met it: it cannot fence, so it neither
        # takes the guest back nor removes its copy (before, it gave up here and
        # left both, with its QEMU, until its worker's next start).
        source = net.hosts["a"].worker
        assert source is not None
        wait_until(lambda: "Cannot reach Redis to settle the migration of sw1"
                   in source.log(), 60, "a's task to meet the cut")
        assert at_most_one(net, "sw1") == ["b"]
        assert pids_of(f"{root(net, 'a')}/vms/sw1/")
        net.mend("a")
        mended_at = time.monotonic()
        wait_live(net, "a")
        ends_on_b(server, net, vm, before)
        print(f"a settled {time.monotonic() - mended_at:.1f} s after its link returned")
        done(vm.turn_off())
        done(vm.delete())


def test_a_partition_of_a_from_b_after_the_switch_over_signal(network: Network) -> None:
    """a and b lose each other after a signalled the switch-over, before b moved the
    record and ran the guest; both still reach Redis.  The migration stream is
    whole on b (it waits for its incoming side to read completed before its pause
    point), and nothing between the hosts is needed any more: b moves the record,
    runs the guest and says so through Redis; a quits its QEMU and removes its
    copies.  Both tasks succeed."""
    net = network
    marker = hosts(net, "nbd-server-stop")
    with connect(net) as server:
        vm = running_guest(server, net, "sw2", data_mb=4)
        before = boot_id(root(net, "a"), "sw2")
        task, into = migrate_to_the_switch_over(server, net, vm, marker)
        assert at_most_one(net, "sw2") == []
        net.partition("a", "b")
        marker.unlink()
        done(into)
        assert at_most_one(net, "sw2") == ["b"]
        done(task)
        ends_on_b(server, net, vm, before)
        net.heal("a", "b")
        done(vm.turn_off())
        done(vm.delete())


def test_a_destination_cut_off_between_its_compare_and_set_and_cont(
        network: Network) -> None:
    """b has moved the record and loses its cable before its ``cont``: it runs the
    guest (the record names it), but cannot tell a.  a judges b's task dead once
    b's lease lapses, fences, finds the VM moved and removes its copies: its task
    ends ThreadCrashError "after the VM had moved".  b's VM reads Invalid while b is
    cut off; once b's link returns, its task records the QEMU that runs the guest."""
    net = network
    marker = hosts(net, "cont")
    with connect(net) as server:
        vm = running_guest(server, net, "sw3", data_mb=4)
        before = boot_id(root(net, "a"), "sw3")
        task, into = migrate_to_the_switch_over(server, net, vm, marker)
        assert server.redis.hget(keys.vm_record("sw3"), "host") == "b"
        assert at_most_one(net, "sw3") == []
        net.cut("b")
        marker.unlink()
        wait_until(lambda: answers(net, "b", "sw3"), 60, "b to run the guest")
        assert at_most_one(net, "sw3") == ["b"]
        assert task.wait_for_completion(int((LEASE + 30) * 1000)), "the migration hangs"
        print(f"\nb cut before its cont: {task.result!r}: {task.error_description}")
        assert (task.result, task.error) == (VMTaskResult.ThreadCrashError,
                                             hresults.SERVER_FAULT), task.error_description
        assert "after the VM had moved" in task.error_description
        assert nothing_of(net, "a", "sw3") == []
        assert at_most_one(net, "sw3") == ["b"]
        wait_until(lambda: vm.state is S.Invalid, 30, "b's VM to read Invalid")
        assert server.redis.hget(keys.vm_record("sw3"), "host") == "b"
        # The cut lasts until b's task has met it (before, it gave up here, and the
        # record kept naming a's QEMU, gone by now, as the VM's process).
        destination = net.hosts["b"].worker
        assert destination is not None
        wait_until(lambda: "Cannot reach Redis to record the migration of sw3"
                   in destination.log(), 60, "b's task to meet the cut")
        assert int(vm.details["pid"]) not in pids_of(f"{root(net, 'b')}/vms/sw3/")
        net.mend("b")
        wait_live(net, "b")
        assert into.wait_for_completion(60_000), "b's task hangs"
        ends_on_b(server, net, vm, before)
        done(vm.turn_off())
        done(vm.delete())
