"""Live migration between hosts as separate machines (`tests.netns`): each worker in
its own network namespace, so the mirror's NBD connection and QEMU's migration stream
go only through the advertised addresses, and faults are made in the network."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from api import VirtualMachine, VirtualServer, VMTask, VMTaskResult, VMVMState
from api.protocol import hresults, keys
from tests.guests import BLOCK, agent, boot_id, guest_write
from tests.helpers import assert_succeeded as done
from tests.helpers import backing_chain, digest, pids_of, qemu_io
from tests.netns import Network, wait_live
from tests.netns_helpers import FAST, LEASE, STALL, connect, nothing_of, root, running_guest, where
from workers.devtools.sandbox import wait_until
from workers.devtools.tinyguest import build_tiny_guest
from workers.engines import qemu_vm
from workers.engines.qemu_vm import Monitor

pytestmark = pytest.mark.slow
S = VMVMState
# What a's link sends, in Mbit/s, while a fault is made mid-transfer.
SLOW_LINK = 32


@pytest.fixture
def net(network: Network) -> Iterator[Network]:
    guest = build_tiny_guest()
    for name in ("a", "b"):
        network.add_host(name)
    for name in ("a", "b"):
        worker = network.start_worker(name, env=FAST)
        (worker.storage_root / "guest").mkdir(parents=True, exist_ok=True)
        shutil.copy(guest.kernel, worker.storage_root / "guest" / "vmlinuz")
        shutil.copy(guest.initrd, worker.storage_root / "guest" / "initrd.gz")
    yield network


def unthrottle(net: Network, name: str) -> None:
    subprocess.run(["tc", "-n", net.hosts[name].namespace, "qdisc", "del", "dev", "eth0",
                    "root"], check=True, capture_output=True, timeout=30)


def under_way(task: VMTask, percent: float = 10, timeout: float = 60) -> None:
    """Until the task's progress reaches ``percent``, still short of done: the disks are
    on their way (the first percents are the destination's preparation)."""
    wait_until(lambda: task.percent_completed >= percent, timeout,
               "the migration to be under way", interval=0.1)
    assert not task.is_complete and task.percent_completed < 100


def slow_migration(server: VirtualServer, net: Network, name: str, *, data_mb: int
                   ) -> tuple[VirtualMachine, str, VMTask]:
    """A running guest on a migrating to b over a slow link, caught mid-transfer:
    (the VM, its boot id, the task)."""
    vm = running_guest(server, net, name, data_mb=data_mb)
    before = boot_id(root(net, "a"), name)
    net.throttle("a", SLOW_LINK)
    task = vm.migrate("b")
    under_way(task)
    return vm, before, task


def still_on_a(server: VirtualServer, net: Network, vm: VirtualMachine, before: str) -> None:
    """The guest runs on at a, the same boot, and the record says so."""
    assert where(vm) == ("a", S.Running)
    assert server.redis.hget(keys.vm_record(vm.name), "host") == "a"
    assert boot_id(root(net, "a"), vm.name) == before


def moves_to_b_after_all(net: Network, vm: VirtualMachine, before: str) -> None:
    """Nothing of an interrupted migration is in the way of the next one."""
    unthrottle(net, "a")
    done(vm.migrate("b"))
    assert where(vm) == ("b", S.Running)
    assert boot_id(root(net, "b"), vm.name) == before
    assert nothing_of(net, "a", vm.name) == []


def test_a_running_guest_moves_live_between_namespaces(net: Network, tmp_path: Path) -> None:
    with connect(net) as server:
        vm = running_guest(server, net, "ns1", data_mb=8)
        disk = root(net, "a") / "ns1" / "d.qcow2"
        pristine = tmp_path / "pristine.qcow2"
        shutil.copy(disk, pristine)
        before = boot_id(root(net, "a"), "ns1")
        with agent(root(net, "a"), "ns1") as client:
            guest_write(client, 0x3c)  # through the guest's page cache, synced
        started = time.monotonic()
        done(vm.migrate("b"))
        took = time.monotonic() - started
        print(f"\nlive migration across namespaces: {took:.2f} s")
        assert where(vm) == ("b", S.Running)
        assert server.redis.hget(keys.vm_record("ns1"), "host") == "b"
        # The same boot, answering through b's QEMU.
        assert boot_id(root(net, "b"), "ns1") == before
        assert nothing_of(net, "a", "ns1") == []
        assert not server.redis.keys(keys.transfer("*"))
        done(vm.turn_off())  # on b
        moved = root(net, "b") / "ns1" / "d.qcow2"
        qemu_io(moved, "qcow2", f"read -P 0x3c 0 {BLOCK}", "read -P 0x5a 1M 8M")
        qemu_io(pristine, "qcow2", f"write -P 0x3c 0 {BLOCK}")
        compared = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2",
                                   str(pristine), str(moved)], capture_output=True, text=True)
        assert compared.returncode == 0, compared.stdout + compared.stderr
        done(vm.delete())


def test_a_partition_of_a_from_b_mid_transfer_leaves_the_guest_on_a(net: Network) -> None:
    """Both hosts still reach Redis, so neither task sees its peer die: the source's
    stall bound (``VMTASK_TRANSFER_STALL_SECONDS``) ends the migration TimeOutError,
    the guest runs on at a, and b drops what it received when a gives up."""
    with connect(net) as server:
        vm, before, task = slow_migration(server, net, "ns2", data_mb=48)
        net.partition("a", "b")
        cut_at = time.monotonic()
        assert task.wait_for_completion(int((STALL + 40) * 1000)), "the migration hangs"
        took = time.monotonic() - cut_at
        snap = task.snapshot()
        ended = snap.result.name if snap.result is not None else None
        print(f"\npartition mid-migration: {ended} after {took:.1f} s: {snap.error_description}")
        assert (snap.result, snap.error) == (VMTaskResult.TimeOutError, hresults.TIMEOUT)
        assert "stalled" in snap.error_description
        assert snap.percent_completed < 100
        still_on_a(server, net, vm, before)  # never restarted
        wait_until(lambda: nothing_of(net, "b", "ns2") == [], 30, "b to drop the migration")
        net.heal("a", "b")
        moves_to_b_after_all(net, vm, before)
        done(vm.turn_off())
        qemu_io(root(net, "b") / "ns2" / "d.qcow2", "qcow2", "read -P 0x5a 1M 48M")
        done(vm.delete())


def test_a_cut_from_redis_mid_transfer_leaves_the_guest_on_a(net: Network) -> None:
    """The rule: the guest runs where the record names, and only the destination moves
    the record (fenced by ``vm_move.lua``), once the source has told it to switch over
    through Redis.  A source cut from everything mid-transfer cannot, so the guest
    stays on a and the record keeps naming a: the producer judges the task
    ThreadCrashError once a's lease lapses, and a's VM reads Invalid meanwhile; b
    drops what it received once a's heartbeat is gone; a's task, unable to reach
    Redis, takes the guest back from the broken migration on its own (never having
    signalled the switch-over, it needs no fence for that); back on the network, a
    reconciles and the VM reads Running on a."""
    with connect(net) as server:
        vm, before, task = slow_migration(server, net, "ns3", data_mb=24)
        net.cut("a")
        cut_at = time.monotonic()
        assert task.wait_for_completion(int((LEASE + 30) * 1000)), "the migration hangs"
        crashed_after = time.monotonic() - cut_at
        assert (task.result, task.error) == (VMTaskResult.ThreadCrashError,
                                             hresults.SERVER_FAULT), task.error_description
        assert crashed_after <= LEASE + 5, crashed_after  # the crash bound: a's lease
        wait_until(lambda: vm.state is S.Invalid, 30, "a's VM to read Invalid")
        assert server.redis.hget(keys.vm_record("ns3"), "host") == "a"
        wait_until(lambda: nothing_of(net, "b", "ns3") == [], 30, "b to drop the migration")
        # a gives up on its own, cut off as it is (its log says so: Redis cannot).
        source = net.hosts["a"].worker
        assert source is not None
        wait_until(lambda: f"live_out {task.id} ended" in source.log()
                   or f"live_out {task.id} failed" in source.log(), 60,
                   "a's task to give up")
        gave_up = source.log().split(f"live_out {task.id} ")[1].splitlines()[0]
        print(f"\na's task, cut off: {gave_up}")
        with Monitor(qemu_vm.VMPaths(root(net, "a") / "vms" / "ns3")) as monitor:
            assert monitor.execute("query-jobs") == []  # no mirror left
            assert not [n for n in monitor.execute("query-named-block-nodes")
                        if n["node-name"].startswith("migrate-target")]
            assert monitor.execute("query-status")["status"] == "running"
        assert boot_id(root(net, "a"), "ns3") == before  # the guest ran on at a throughout
        net.mend("a")
        mended_at = time.monotonic()
        wait_live(net, "a")
        wait_until(lambda: where(vm) == ("a", S.Running), 60, "a to reconcile its VM")
        print(f"\ncut mid-migration: ThreadCrashError after {crashed_after:.1f} s; "
              f"reconciled {time.monotonic() - mended_at:.1f} s after mending")
        assert boot_id(root(net, "a"), "ns3") == before
        assert nothing_of(net, "b", "ns3") == []
        moves_to_b_after_all(net, vm, before)
        done(vm.turn_off())
        done(vm.delete())


def test_cancel_mid_transfer_leaves_the_guest_on_a(net: Network) -> None:
    """Cancelled while the disk is on its way over the slow link: the guest runs on at
    a, same boot, the record names a, and b drops its QEMU and what it received."""
    with connect(net) as server:
        vm, before, task = slow_migration(server, net, "ns4", data_mb=48)
        assert pids_of(f"{root(net, 'b')}/vms/ns4/")  # b's QEMU is receiving
        task.cancel()
        assert task.wait_for_completion(60_000), "the cancel was not honoured"
        assert (task.result, task.error) == (VMTaskResult.Cancelled, hresults.E_ABORT), \
            task.error_description
        assert task.percent_completed < 100
        still_on_a(server, net, vm, before)
        wait_until(lambda: nothing_of(net, "b", "ns4") == [], 30, "b to drop the migration")
        moves_to_b_after_all(net, vm, before)
        done(vm.turn_off())
        qemu_io(root(net, "b") / "ns4" / "d.qcow2", "qcow2", "read -P 0x5a 1M 48M")
        done(vm.delete())


def test_kill_9_of_the_destination_worker_mid_transfer_leaves_the_guest_on_a(
        net: Network) -> None:
    """b's worker killed mid-transfer: its QEMU survives (daemonized, paused, never
    run), a notices the lapsed lease, takes the guest back and ends ThreadCrashError;
    the guest runs on a alone; b's restarted worker removes the QEMU and the disks."""
    with connect(net) as server:
        vm, before, task = slow_migration(server, net, "ns5", data_mb=48)
        receiving = pids_of(f"{root(net, 'b')}/vms/ns5/")
        assert len(receiving) == 1
        destination = net.hosts["b"].worker
        assert destination is not None
        destination.kill()
        killed_at = time.monotonic()
        assert task.wait_for_completion(int((LEASE + 30) * 1000)), "the migration hangs"
        took = time.monotonic() - killed_at
        print(f"\nkill -9 of the destination mid-migration: {task.result!r} after {took:.1f} s")
        assert (task.result, task.error) == (VMTaskResult.ThreadCrashError,
                                             hresults.SERVER_FAULT), task.error_description
        still_on_a(server, net, vm, before)
        # Exactly one guest: b's QEMU never ran it, and is still there (nobody to stop it).
        assert pids_of(f"{root(net, 'b')}/vms/ns5/") == receiving
        with Monitor(qemu_vm.VMPaths(root(net, "b") / "vms" / "ns5")) as monitor:
            assert monitor.execute("query-status")["status"] != "running"
        net.start_worker("b", env=FAST)  # its start-up removes the leftovers
        wait_until(lambda: nothing_of(net, "b", "ns5") == [], 30,
                   "the restarted b to clean up")
        still_on_a(server, net, vm, before)
        moves_to_b_after_all(net, vm, before)
        done(vm.turn_off())
        done(vm.delete())


COPY_FAULTS = {"cancel": (VMTaskResult.Cancelled, hresults.E_ABORT),
               "kill": (VMTaskResult.ThreadCrashError, hresults.SERVER_FAULT),
               "partition": (VMTaskResult.TimeOutError, hresults.TIMEOUT)}


@pytest.mark.parametrize("fault", sorted(COPY_FAULTS))
def test_an_undoable_guest_moves_live_as_its_chain_after_a_fault_mid_copy(
        net: Network, fault: str) -> None:
    """An undoable VM: its base disk is copied byte for byte first, then only the undo
    overlay is mirrored.  Cancelled, b's worker killed, or a partitioned from b (b's
    pull stalls) while the base is on its way (b holds its temporary): the guest runs
    on at a and b keeps nothing (after a kill, once its worker is back); then it
    moves, and b has the same base and an overlay over it that merges."""
    with connect(net) as server:
        vm = running_guest(server, net, "ns6", data_mb=48, undoable=True)
        base, overlay = "ns6/d.qcow2", "vms/ns6/undo/0-d.qcow2"
        before = boot_id(root(net, "a"), "ns6")
        with agent(root(net, "a"), "ns6") as client:
            guest_write(client, 0x3c)  # into the overlay
        pristine = digest(root(net, "a") / base)
        net.throttle("a", SLOW_LINK)
        task = vm.migrate("b")
        wait_until(lambda: list((root(net, "b") / "ns6").glob("*.tmp"))
                   and 2 < task.percent_completed < 100, 60, "the base to be on its way")
        assert not pids_of(f"{root(net, 'b')}/vms/ns6/")  # no QEMU before the base is there
        destination = net.hosts["b"].worker
        assert destination is not None
        if fault == "cancel":
            task.cancel()
        elif fault == "kill":
            destination.kill()
        else:
            net.partition("a", "b")
        assert task.wait_for_completion(int((LEASE + STALL + 30) * 1000)), "it hangs"
        print(f"\n{fault} mid-copy of the base: {task.result!r}: {task.error_description}")
        assert (task.result, task.error) == COPY_FAULTS[fault], task.error_description
        still_on_a(server, net, vm, before)
        net.heal("a", "b")
        if fault == "kill":
            assert nothing_of(net, "b", "ns6") != []  # nobody there to clean up yet
            net.start_worker("b", env=FAST)
        wait_until(lambda: nothing_of(net, "b", "ns6") == [], 30, "b to drop the migration")
        chain = backing_chain(root(net, "a") / overlay)
        moves_to_b_after_all(net, vm, before)
        done(vm.turn_off())  # on b
        assert backing_chain(root(net, "b") / overlay) == chain
        assert digest(root(net, "b") / base) == pristine
        qemu_io(root(net, "b") / overlay, "qcow2", f"read -P 0x3c 0 {BLOCK}",
                "read -P 0x5a 1M 48M")
        done(vm.merge_undo_disks())
        assert not (root(net, "b") / overlay).exists()
        qemu_io(root(net, "b") / base, "qcow2", f"read -P 0x3c 0 {BLOCK}")
        done(vm.delete())
