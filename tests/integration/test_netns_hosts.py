"""Hosts as separate machines (`tests.netns`): each worker in its own network namespace,
reaching Redis and the other host only through a bridge, by address.  Faults are made
in the network: a partition of two hosts, a host's cable pulled, kill -9 of a worker."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from api import VirtualMachine, VirtualServer, VMTask, VMTaskResult, VMVMState
from api.protocol import hresults, keys
from tests.helpers import assert_succeeded as done
from tests.helpers import big_image, digest, qemu_io, serve_task_of
from tests.netns import Network, wait_live
from tests.netns_helpers import FAST, LEASE, STALL, files_under, install_guest, offer_of, root
from workers.devtools.sandbox import wait_until
from workers.devtools.tinyguest import READY_MARKER

pytestmark = pytest.mark.slow
S = VMVMState


@pytest.fixture
def net(network: Network) -> Iterator[Network]:
    for name in ("a", "b"):
        network.add_host(name)
    for name in ("a", "b"):
        network.start_worker(name, env=FAST)
    yield network


@pytest.fixture
def server(net: Network) -> Iterator[VirtualServer]:
    assert net.redis is not None
    with VirtualServer(net.redis.url, host="a", poll_interval=0.2) as vs:
        yield vs


def _address(hex_pair: str) -> tuple[str, int]:
    address, port = hex_pair.split(":")
    return socket.inet_ntoa(bytes.fromhex(address)[::-1]), int(port, 16)


def established(net: Network, name: str) -> set[tuple[tuple[str, int], tuple[str, int]]]:
    """(local, remote) of every established TCP connection in the host's namespace."""
    worker = net.hosts[name].worker
    assert worker is not None and worker.proc is not None
    lines = Path(f"/proc/{worker.proc.pid}/net/tcp").read_text().splitlines()[1:]
    return {(_address(f[1]), _address(f[2])) for f in map(str.split, lines) if f[3] == "01"}


# -- copies between namespaces ---------------------------------------------------------


def test_a_copy_goes_through_the_advertised_address(net: Network,
                                                    server: VirtualServer) -> None:
    a, b = net.hosts["a"], net.hosts["b"]
    assert server.host_status()["a"]["transfer_address"] == a.address
    source = big_image(root(net, "a"), "d/big.img", 96)
    before = digest(source)
    net.throttle("a", 200)  # ~4 s for 96 MiB: long enough to look at the connection
    task = server.get_hard_disk("d/big.img").copy_to("b", "d/copy.img")
    offer = offer_of(server)
    port = int(offer["port"])
    assert offer["address"] == a.address
    # The export is bound to the advertised address only, and B's 127.0.0.1 is its own.
    assert not a.can_connect("127.0.0.1", port)
    assert not b.can_connect("127.0.0.1", port)
    wait_until(lambda: any(local == (a.address, port) and remote[0] == b.address
                           for local, remote in established(net, "a")),
               30, "B's connection to A's advertised address")
    done(task)
    assert digest(root(net, "b") / "d" / "copy.img") == before == digest(source)
    assert files_under(root(net, "b")) == ["d/copy.img"]


def test_a_partition_mid_copy_ends_the_copy_and_leaves_nothing(
        net: Network, server: VirtualServer) -> None:
    source = big_image(root(net, "a"), "d/big.img", 96)
    before = digest(source)
    net.throttle("a", 100)
    task = server.get_hard_disk("d/big.img").copy_to("b", "d/copy.img")
    wait_until(lambda: task.percent_completed >= 5, 60, "the copy to be under way")
    net.partition("a", "b")
    started = time.monotonic()
    # Without the stall bound TCP would keep the copy waiting for many minutes.
    assert task.wait_for_completion(int((STALL + 30) * 1000)), "the copy hangs"
    took = time.monotonic() - started
    snap = task.snapshot()
    print(f"partition mid-copy: ended {snap.result.name} after {took:.1f} s")
    assert (snap.result, snap.error) == (VMTaskResult.TimeOutError, hresults.TIMEOUT)
    assert "received nothing" in snap.error_description and "from a" in snap.error_description
    assert snap.percent_completed < 100
    assert files_under(root(net, "b")) == []
    assert digest(source) == before
    serve = server.get_task(serve_task_of(server, task.id))
    assert serve.wait_for_completion(30_000)
    net.heal("a", "b")
    done(server.get_hard_disk("d/big.img").copy_to("b", "d/again.img"))
    assert digest(root(net, "b") / "d" / "again.img") == before


def test_a_partition_is_a_timeout_even_when_the_source_lease_lapses_meanwhile(
        net: Network, server: VirtualServer) -> None:
    """The source's serve loses its lease during the partition (as when a loaded host
    renews it too late and a reaper gets there first): its host stays live in Redis,
    so the stalled copy still met a partition, not a lost source."""
    source = big_image(root(net, "a"), "d/big.img", 96)
    net.throttle("a", 100)
    task = server.get_hard_disk("d/big.img").copy_to("b", "d/copy.img")
    wait_until(lambda: task.percent_completed >= 5, 60, "the copy to be under way")
    net.partition("a", "b")
    serve = serve_task_of(server, task.id)

    def judged_crashed() -> bool:
        # Every renewal comes too late: the lease is gone and its deadline past.
        server.redis.delete(keys.task_lease(serve))
        server.redis.zadd(keys.LEASE_DEADLINES, {serve: 0})
        return server.redis.hget(keys.task_record(serve), "result") == str(
            int(VMTaskResult.ThreadCrashError))
    wait_until(judged_crashed, LEASE, "a reaper to judge the serve crashed", interval=0.2)
    assert not task.is_complete  # before the copy's own stall bound
    assert server.redis.exists(keys.host_heartbeat("a"))
    assert task.wait_for_completion(int((STALL + 30) * 1000)), "the copy hangs"
    snap = task.snapshot()
    assert (snap.result, snap.error) == (VMTaskResult.TimeOutError, hresults.TIMEOUT), \
        snap.error_description
    assert "received nothing" in snap.error_description
    assert files_under(root(net, "b")) == []
    assert files_under(root(net, "a")) == ["d/big.img"] and source.exists()


# -- a host cut from everything ----------------------------------------------------------


def qemu_pid(net: Network, host: str, vm: str) -> int:
    return int((root(net, host) / "vms" / vm / "qemu.pid").read_text().strip())


def test_a_host_cut_from_redis_crashes_its_tasks_and_is_reconciled(
        net: Network, server: VirtualServer) -> None:
    keep, lost, off = (server.create_virtual_machine(n, memory_mb=64, host="a", network=None)
                       for n in ("keep", "lost", "off"))
    done(keep.startup())
    done(lost.startup())
    keep_pid = qemu_pid(net, "a", "keep")
    task = server.ping(duration_ms=30_000, steps=300, host="a")
    wait_until(lambda: task.percent_completed > 0, 30, "the task to run on a")
    net.cut("a")
    cut_at = time.monotonic()
    # The producer judges the task by its lease, which a cut host cannot renew.
    assert task.wait_for_completion(int((LEASE + 20) * 1000))
    crashed_after = time.monotonic() - cut_at
    assert (task.result, task.error) == (VMTaskResult.ThreadCrashError, hresults.SERVER_FAULT)
    assert crashed_after <= LEASE + 5, crashed_after
    wait_until(lambda: all(vm.state is S.Invalid for vm in (keep, lost, off)), 30,
               "the cut host's VMs to read Invalid")
    invalid_after = time.monotonic() - cut_at
    assert server.redis.hget(keys.vm_record("keep"), "host") == "a"
    # While the host is cut off, one of its VMs really dies.
    os.kill(qemu_pid(net, "a", "lost"), signal.SIGKILL)
    net.mend("a")
    mended_at = time.monotonic()
    wait_live(net, "a")
    wait_until(lambda: keep.state is S.Running and lost.state is S.Invalid
               and off.state is S.TurnedOff, 60, "the host to reconcile its VMs")
    # The record itself, not only the read, says the dead VM crashed.
    assert server.redis.hget(keys.vm_record("lost"), "state") == str(int(S.Invalid))
    print(f"cut: task crashed after {crashed_after:.1f} s, VMs Invalid after "
          f"{invalid_after:.1f} s; reconciled {time.monotonic() - mended_at:.1f} s after mending")
    assert qemu_pid(net, "a", "keep") == keep_pid  # the same QEMU, never restarted
    # The task that ran on while the host was cut stays judged: it stopped, not finished.
    worker = net.hosts["a"].worker
    assert worker is not None
    wait_until(lambda: "judged crashed; stopping it" in worker.log(), 30,
               "the cut host's task to notice its lease was lost")
    assert task.snapshot().result is VMTaskResult.ThreadCrashError
    done(keep.turn_off())
    done(lost.turn_off())
    for vm in (keep, lost, off):
        done(vm.delete())


# -- moving a saved VM -----------------------------------------------------------------


def test_a_saved_vm_moves_and_restores_on_the_destination(
        net: Network, server: VirtualServer) -> None:
    install_guest(net)
    done(server.create_dynamic_virtual_hard_disk("d/g.qcow2", 16))
    qemu_io(root(net, "a") / "d" / "g.qcow2", "qcow2", "write -P 0x5a 0 1M")
    vm = server.create_virtual_machine(
        "sv", memory_mb=128, disks=["d/g.qcow2"], kernel="guest/vmlinuz",
        initrd="guest/initrd.gz", append="console=ttyS0 quiet panic=-1", guest_agent=True,
        host="a", network=None)
    done(vm.startup())
    wait_until(lambda: vm.guest_os.is_heartbeating, 90, "the guest agent on a")
    done(vm.save())
    saved = root(net, "a") / "vms" / "sv"
    moving = {"d/g.qcow2": digest(root(net, "a") / "d" / "g.qcow2"),
              "vms/sv/saved.state": digest(saved / "saved.state")}
    task = vm.migrate("b")
    done(task)
    assert vm.state is S.Saved and vm.host == "b"  # reading the state refreshes the host
    on_b = root(net, "b")
    assert {name: digest(on_b / name) for name in moving} == moving
    assert (on_b / "vms" / "sv" / "saved.state.json").exists()
    wait_until(lambda: not saved.exists(), 30, "the source to remove the moved VM")
    assert files_under(root(net, "a")) == ["guest/initrd.gz", "guest/vmlinuz"]
    done(vm.startup())  # a restore, on b
    assert vm.state is S.Running
    wait_until(lambda: vm.guest_os.is_heartbeating, 60, "the guest agent through b")
    # Restored, not rebooted: the guest never printed its boot marker on b.
    assert READY_MARKER not in (on_b / "vms" / "sv" / "serial.log").read_text(errors="replace")
    assert not (on_b / "vms" / "sv" / "saved.state").exists()
    done(vm.turn_off())
    qemu_io(on_b / "d" / "g.qcow2", "qcow2", "read -P 0x5a 0 1M")
    done(vm.delete())


# -- kill -9 of the destination's worker -------------------------------------------------


def kill_destination(net: Network) -> float:
    worker = net.hosts["b"].worker
    assert worker is not None
    worker.kill()
    return time.monotonic()


def test_kill_9_of_the_destination_mid_copy(net: Network, server: VirtualServer) -> None:
    a = net.hosts["a"]
    source = big_image(root(net, "a"), "d/big.img", 96)
    before = digest(source)
    net.throttle("a", 100)
    task = server.get_hard_disk("d/big.img").copy_to("b", "d/copy.img")
    port = int(offer_of(server)["port"])
    wait_until(lambda: task.percent_completed >= 5, 60, "the copy to be under way")
    killed_at = kill_destination(net)
    assert task.wait_for_completion(int((LEASE + 20) * 1000))
    assert (task.result, task.error) == (VMTaskResult.ThreadCrashError, hresults.SERVER_FAULT)
    print(f"kill -9 mid-copy: ThreadCrashError after {time.monotonic() - killed_at:.1f} s")
    serve = server.get_task(serve_task_of(server, task.id))
    assert serve.wait_for_completion(30_000)
    # The export closed with its client gone (and the serve ended by itself).
    assert not a.can_connect(a.address, port), (serve.result, serve.error_description)
    assert digest(source) == before
    left = files_under(root(net, "b"))
    assert len(left) == 1 and left[0].startswith("d/"), left  # the dead pull's temporary
    net.start_worker("b", env=FAST)
    assert files_under(root(net, "b")) == []
    done(server.get_hard_disk("d/big.img").copy_to("b", "d/copy.img"))
    assert digest(root(net, "b") / "d" / "copy.img") == before


@pytest.mark.parametrize("fault", ["kill", "cut"])
def test_losing_the_source_mid_copy_is_a_crash(net: Network, server: VirtualServer,
                                               fault: str) -> None:
    """The source's worker killed, or its host cut off: the export vanishes with it,
    and the pull ends ThreadCrashError (once the source's lease lapses), not an I/O
    error."""
    source = big_image(root(net, "a"), "d/big.img", 96)
    before = digest(source)
    net.throttle("a", 100)
    task = server.get_hard_disk("d/big.img").copy_to("b", "d/copy.img")
    wait_until(lambda: task.percent_completed >= 5, 60, "the copy to be under way")
    worker = net.hosts["a"].worker
    assert worker is not None
    if fault == "kill":
        worker.kill()
    else:
        net.cut("a")
    lost_at = time.monotonic()
    assert task.wait_for_completion(int((STALL + LEASE + 30) * 1000))
    assert (task.result, task.error) == (VMTaskResult.ThreadCrashError, hresults.SERVER_FAULT)
    assert "source host a died" in task.error_description
    print(f"source {fault} mid-copy: ThreadCrashError after {time.monotonic() - lost_at:.1f} s")
    assert files_under(root(net, "b")) == []
    if fault == "kill":
        net.start_worker("a", env=FAST)
    else:
        net.mend("a")
        wait_live(net, "a")
    assert digest(source) == before
    done(server.get_hard_disk("d/big.img").copy_to("b", "d/again.img"))
    assert digest(root(net, "b") / "d" / "again.img") == before


def test_kill_9_of_the_destination_mid_move(net: Network, server: VirtualServer) -> None:
    sources, vm, task = moving(net, server, "mv")
    killed_at = kill_destination(net)
    assert task.wait_for_completion(int((LEASE + 20) * 1000))
    assert (task.result, task.error) == (VMTaskResult.ThreadCrashError, hresults.SERVER_FAULT)
    print(f"kill -9 mid-move: ThreadCrashError after {time.monotonic() - killed_at:.1f} s")
    out = server.get_task(serve_task_of(server, task.id))
    assert out.wait_for_completion(30_000) and out.snapshot().output == {"moved": False}
    assert server.redis.hget(keys.vm_record("mv"), "host") == "a"
    assert vm.state is S.TurnedOff and vm.host == "a"
    assert {p: digest(root(net, "a") / p) for p in sources} == sources
    left = files_under(root(net, "b"))
    assert "mv/small.qcow2" in left and "vms/mv/incoming.json" in left, left
    net.start_worker("b", env=FAST)
    assert files_under(root(net, "b")) == []
    assert not (root(net, "b") / "vms" / "mv").exists()
    done(vm.migrate("b"))  # nothing in the way of a new move
    assert vm.state is S.TurnedOff and vm.host == "b"
    assert {p: digest(root(net, "b") / p) for p in sources} == sources


def test_kill_9_of_the_source_mid_move(net: Network, server: VirtualServer) -> None:
    sources, vm, task = moving(net, server, "ks")
    worker = net.hosts["a"].worker
    assert worker is not None
    worker.kill()
    killed_at = time.monotonic()
    assert task.wait_for_completion(int((STALL + LEASE + 30) * 1000))
    assert (task.result, task.error) == (VMTaskResult.ThreadCrashError, hresults.SERVER_FAULT)
    print(f"source kill mid-move: ThreadCrashError after {time.monotonic() - killed_at:.1f} s")
    assert server.redis.hget(keys.vm_record("ks"), "host") == "a"
    assert files_under(root(net, "b")) == []  # the live destination removed what it pulled
    assert {p: digest(root(net, "a") / p) for p in sources} == sources
    net.start_worker("a", env=FAST)
    assert vm.state is S.TurnedOff and vm.host == "a"
    done(vm.migrate("b"))  # the killed task's VM lock died with it
    assert vm.state is S.TurnedOff and vm.host == "b"
    assert {p: digest(root(net, "b") / p) for p in sources} == sources


# -- a cold move interrupted: partition, cancel ------------------------------------------


def two_disk_vm(net: Network, server: VirtualServer, name: str) -> dict[str, str]:
    """A TurnedOff VM on a with a small disk (moved first) and a big one; their digests."""
    done(server.create_dynamic_virtual_hard_disk(f"{name}/small.qcow2", 8))
    qemu_io(root(net, "a") / name / "small.qcow2", "qcow2", "write -P 0x71 0 1M")
    big_image(root(net, "a"), f"{name}/big.img", 96)
    server.create_virtual_machine(name, memory_mb=64, host="a", network=None,
                                  disks=[f"{name}/small.qcow2", f"{name}/big.img"])
    return {p: digest(root(net, "a") / p) for p in (f"{name}/small.qcow2", f"{name}/big.img")}


def moving(net: Network, server: VirtualServer, name: str
           ) -> tuple[dict[str, str], VirtualMachine, VMTask]:
    """`two_disk_vm` moving to b over a slow link, caught mid-move: the small disk is
    pulled whole (a published file, no temporary) before the big one.  (The digests,
    the VM, the task.)"""
    sources = two_disk_vm(net, server, name)
    vm = server.find_virtual_machine(name)
    assert vm is not None
    net.throttle("a", 100)
    task = vm.migrate("b")
    wait_until(lambda: (root(net, "b") / name / "small.qcow2").exists()
               and task.percent_completed >= 5, 60, "the move to be under way")
    return sources, vm, task


@pytest.mark.parametrize("fault", ["partition", "cancel"])
def test_a_move_interrupted_mid_transfer_leaves_the_vm_on_its_host(
        net: Network, server: VirtualServer, fault: str) -> None:
    sources, vm, task = moving(net, server, "iv")
    if fault == "partition":
        net.partition("a", "b")
    else:
        task.cancel()
    assert task.wait_for_completion(int((STALL + 30) * 1000))
    expected = ((VMTaskResult.TimeOutError, hresults.TIMEOUT) if fault == "partition"
                else (VMTaskResult.Cancelled, hresults.E_ABORT))
    assert (task.result, task.error) == expected, task.error_description
    out = server.get_task(serve_task_of(server, task.id))
    assert out.wait_for_completion(30_000) and out.snapshot().output == {"moved": False}
    assert vm.state is S.TurnedOff and vm.host == "a"
    assert {p: digest(root(net, "a") / p) for p in sources} == sources
    assert files_under(root(net, "b")) == []  # what was pulled went with the failure
    net.heal("a", "b")
    done(vm.migrate("b"))
    assert vm.state is S.TurnedOff and vm.host == "b"
    assert {p: digest(root(net, "b") / p) for p in sources} == sources
