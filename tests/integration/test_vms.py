"""VMs end to end: registry, state machine, save/restore, undo disks, guest OS, events,
the host's watch and reconciliation after a worker is killed.  Real QEMU under TCG."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api import VirtualMachine, VirtualServer, VMTaskResult, VMVMState, errors
from api.protocol import tasks
from api.protocol.vmstate import VMStateEvent
from tests.helpers import assert_succeeded as ok
from tests.helpers import kill_leftover_qemu, qemu_io
from workers.devtools.sandbox import RedisServer, WorkerProcess, wait_until
from workers.devtools.tinyguest import READY_MARKER

S = VMVMState


@pytest.fixture
def server(vm_env: tuple[RedisServer, Path], vmhost: WorkerProcess) -> Iterator[VirtualServer]:
    with VirtualServer(vm_env[0].url, host="vmhost", poll_interval=0.5) as vs:
        yield vs


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    return request.node.name.replace("test_", "")[:40].strip("_")


def make_disk(server: VirtualServer, path: str, size_mb: int = 16) -> None:
    ok(server.create_dynamic_virtual_hard_disk(path, size_mb))


def guest_vm(server: VirtualServer, name: str, *, agent: bool,
             initrd: str = "guest/initrd.gz") -> VirtualMachine:
    return server.create_virtual_machine(
        name, memory_mb=128, kernel="guest/vmlinuz", initrd=initrd,
        append="console=ttyS0 quiet panic=-1", guest_agent=agent)


def qemu_pid(vmhost: WorkerProcess, name: str) -> int | None:
    pidfile = vmhost.storage_root / "vms" / name / "qemu.pid"
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def events_for(server: VirtualServer, name: str, since: str) -> list[VMStateEvent]:
    return [e for e in server.vm_events(since, timeout_ms=200) if e.name == name]


def agent_answers(sock: Path) -> bool:
    from workers.engines.guest_agent import GuestAgentClient
    from workers.failures import OperationTimedOut

    with GuestAgentClient(sock) as agent:
        try:
            return agent.ping(timeout=2)
        except OperationTimedOut:
            return False


def last_event_id(server: VirtualServer) -> str:
    newest = server.redis.xrevrange("vmtask:vm-events", count=1)
    return newest[0][0] if newest else "0"


# -- registry and state machine ------------------------------------------------------


def test_registry_create_find_list_and_duplicates(server: VirtualServer, name: str) -> None:
    vm = server.create_virtual_machine(name, memory_mb=64)
    assert (vm.name, vm.host, vm.state, vm.memory_mb) == (name, "vmhost", S.TurnedOff, 64)
    with pytest.raises(errors.InvalidArgumentError, match="already exists"):
        server.create_virtual_machine(name)
    for bad in ("", "a b", "../x", "x" * 65, ".hidden"):
        with pytest.raises(errors.InvalidArgumentError):
            server.create_virtual_machine(bad)
    with pytest.raises(errors.InvalidArgumentError):
        server.create_virtual_machine(name + "2", memory_mb=0)
    with pytest.raises(errors.InvalidArgumentError):
        server.create_virtual_machine(name + "3", disks=["../escape.qcow2"])
    found = server.find_virtual_machine(name)
    assert found is not None and found.name == name
    assert server.find_virtual_machine("no-such-vm") is None
    assert name in [v.name for v in server.virtual_machines]
    ok(vm.delete())
    assert server.find_virtual_machine(name) is None


def test_illegal_transitions_raise_at_once(server: VirtualServer, name: str) -> None:
    vm = server.create_virtual_machine(name, memory_mb=64)
    queued_before = server.tasks(limit=1)[0].id if server.tasks(limit=1) else None
    for call in (vm.save, vm.pause, vm.resume, vm.reset, vm.guest_os.shutdown,
                 vm.merge_undo_disks):
        with pytest.raises((errors.InvalidStateError, errors.InvalidArgumentError)):
            call()
    assert (server.tasks(limit=1)[0].id if server.tasks(limit=1) else None) == queued_before
    ok(vm.startup())
    assert vm.state is S.Running
    with pytest.raises(errors.InvalidStateError) as caught:
        vm.startup()
    assert caught.value.hresult == 0x8007139F
    with pytest.raises(errors.InvalidStateError):
        vm.delete()
    with pytest.raises(errors.InvalidStateError):
        vm.resume()
    ok(vm.turn_off())
    ok(vm.delete())


def test_the_worker_refuses_a_transition_a_producer_did_not_check(
        server: VirtualServer, name: str) -> None:
    """The worker's own state check (api.errors.InvalidStateError raised in the worker),
    for a producer that skipped the producer's: a result, never a crash."""
    vm = server.create_virtual_machine(name, memory_mb=64)
    task = server.submit(tasks.VM_PAUSE, description="forced pause", kwargs={"name": name},
                         host="vmhost")
    assert task.wait_for_completion(60_000)
    assert (task.result, task.error) == (VMTaskResult.UnexpectedError, 0x8007139F)
    assert task.error_description == f"Cannot pause VM {name!r} while TurnedOff"
    assert vm.state is S.TurnedOff
    ok(vm.delete())


def test_lifecycle_with_every_intermediate_state(server: VirtualServer, vmhost: WorkerProcess,
                                                 name: str) -> None:
    make_disk(server, f"{name}/disk.qcow2")
    vm = server.create_virtual_machine(name, memory_mb=64, disks=[f"{name}/disk.qcow2"])
    since = last_event_id(server)
    ok(vm.startup())
    assert vm.state is S.Running
    ok(vm.pause())
    assert vm.state is S.Paused
    ok(vm.resume())
    ok(vm.reset())
    assert vm.state is S.Running
    save = vm.save()
    assert save.is_cancelable
    ok(save)
    assert vm.state is S.Saved and qemu_pid(vmhost, name) is None
    assert (vmhost.storage_root / "vms" / name / "saved.state").exists()
    ok(vm.startup())  # restore
    assert vm.state is S.Running
    ok(vm.turn_off())
    assert vm.state is S.TurnedOff
    ok(vm.delete())
    changes = [(e.old, e.new) for e in events_for(server, name, since)]
    assert changes == [
        (S.TurnedOff, S.TurningOn), (S.TurningOn, S.Running),
        (S.Running, S.Paused), (S.Paused, S.Running),
        (S.Running, S.Saving), (S.Saving, S.Saved),
        (S.Saved, S.Restoring), (S.Restoring, S.Running),
        (S.Running, S.TurningOff), (S.TurningOff, S.TurnedOff),
        (S.TurnedOff, S.DeleteMachine), (S.DeleteMachine, None),
    ]
    assert not (vmhost.storage_root / "vms" / name).exists()
    assert subprocess.run(["pgrep", "-f", f"vms/{name}/"]).returncode == 1


def test_saving_a_vm_with_a_vhd_disk_is_refused(server: VirtualServer, name: str) -> None:
    make_disk(server, f"{name}/disk.vhd")
    vm = server.create_virtual_machine(name, memory_mb=64, disks=[f"{name}/disk.vhd"])
    ok(vm.startup())
    task = vm.save()
    assert task.wait_for_completion(60_000)
    assert task.result is VMTaskResult.IllegalValueError
    assert "VHD" in task.error_description or "vpc" in task.error_description
    assert vm.state is S.Running
    ok(vm.turn_off())
    ok(vm.delete())


def test_a_corrupt_saved_state_is_incompatible_and_the_vm_stays_saved(
    server: VirtualServer, vmhost: WorkerProcess, name: str
) -> None:
    vm = server.create_virtual_machine(name, memory_mb=64)
    ok(vm.startup())
    ok(vm.save())
    state_file = vmhost.storage_root / "vms" / name / "saved.state"
    data = bytearray(state_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state_file.write_bytes(bytes(data))
    task = vm.startup()
    assert task.wait_for_completion(60_000)
    assert (task.result, task.error) == (VMTaskResult.IncompatibleSavedStateError, 0x80040205)
    assert vm.state is S.Saved and qemu_pid(vmhost, name) is None
    ok(vm.turn_off())  # discards the saved state
    assert vm.state is S.TurnedOff and not state_file.exists()
    ok(vm.delete())


def test_out_of_memory(server: VirtualServer, name: str) -> None:
    vm = server.create_virtual_machine(name, memory_mb=1_000_000)
    task = vm.startup()
    assert task.wait_for_completion(60_000)
    assert (task.result, task.error) == (VMTaskResult.OutOfMemoryError, 0x8007000E)
    assert vm.state is S.TurnedOff
    ok(vm.delete())


def test_cancel_a_save_leaves_the_vm_running(vm_env: tuple[RedisServer, Path],
                                             tmp_path: Path) -> None:
    redis, base = vm_env
    worker = WorkerProcess(redis.url, "slowsave", base / "slow", base, concurrency=1,
                           env={"VMTASK_SAVE_MAX_BANDWIDTH": "100000"}).start()
    try:
        server = VirtualServer(redis.url, host="slowsave", poll_interval=0.5)
        vm = server.create_virtual_machine("slowsave-vm", memory_mb=64)
        ok(vm.startup())
        task = vm.save()
        wait_until(lambda: task.percent_completed > 0 or task.is_complete, 60, "save progress")
        task.cancel()
        assert task.wait_for_completion(60_000)
        assert task.result is VMTaskResult.Cancelled
        assert vm.state is S.Running
        assert not (base / "slow" / "vms" / "slowsave-vm" / "saved.state").exists()
        ok(vm.turn_off())
        ok(vm.delete())
    finally:
        worker.stop()
        kill_leftover_qemu(base / "slow")


# -- undo disks --------------------------------------------------------------------------


def test_undo_disks_merge_and_discard(server: VirtualServer, vmhost: WorkerProcess,
                                      name: str) -> None:
    make_disk(server, f"{name}/base.qcow2")
    base = vmhost.storage_root / name / "base.qcow2"
    qemu_io(base, "qcow2", "write -P 0x11 0 1M")
    vm = server.create_virtual_machine(name, memory_mb=64, disks=[f"{name}/base.qcow2"],
                                       undoable=True)
    ok(vm.startup())
    overlays = list((vmhost.storage_root / "vms" / name / "undo").glob("*.qcow2"))
    assert len(overlays) == 1
    ok(vm.turn_off())
    qemu_io(overlays[0], "qcow2", "write -P 0x22 0 512k")  # what the guest would have written
    qemu_io(base, "qcow2", "read -P 0x11 0 1M")  # the base is untouched while undoable
    ok(vm.discard_undo_disks())
    assert not overlays[0].exists()
    qemu_io(base, "qcow2", "read -P 0x11 0 1M")
    ok(vm.startup())
    ok(vm.turn_off())
    qemu_io(overlays[0], "qcow2", "write -P 0x33 0 512k")
    since = last_event_id(server)
    merge = vm.merge_undo_disks()
    assert merge.is_cancelable is False
    ok(merge)
    qemu_io(base, "qcow2", "read -P 0x33 0 512k", "read -P 0x11 512k 512k")
    assert not overlays[0].exists()
    assert [(e.old, e.new) for e in events_for(server, name, since)] == [
        (S.TurnedOff, S.MergingDrives), (S.MergingDrives, S.TurnedOff)]
    ok(vm.delete())


# -- the guest OS ------------------------------------------------------------------------


def test_guest_shutdown_through_the_agent(server: VirtualServer, vmhost: WorkerProcess,
                                          name: str) -> None:
    vm = guest_vm(server, name, agent=True)
    ok(vm.startup())
    since = last_event_id(server)
    ok(vm.guest_os.restart())
    assert vm.state is S.Running
    # Success means the guest has rebooted: its second boot is up (a real guest's
    # old agent answers on for seconds after the request).
    assert vm.console_log().count(READY_MARKER) == 2
    # At once: a request that reached the dying first boot would be lost.
    ok(vm.guest_os.shutdown(timeout_s=60))
    assert vm.state is S.TurnedOff and qemu_pid(vmhost, name) is None
    assert [(e.old, e.new) for e in events_for(server, name, since)] == [
        (S.Running, S.TurningOff), (S.TurningOff, S.TurnedOff)]
    ok(vm.delete())


def test_a_shutdown_asked_while_the_guest_goes_down_for_a_reboot_is_not_lost(
        server: VirtualServer, vmhost: WorkerProcess, name: str) -> None:
    """The request reaches the dying boot's agent, which still answers, and dies with
    it: the task must ask the next boot again (or press the ACPI button)."""
    from workers.engines.guest_agent import GuestAgentClient

    vm = guest_vm(server, name, agent=True)
    ok(vm.startup())
    sock = vmhost.storage_root / "vms" / name / "qga.sock"
    wait_until(lambda: agent_answers(sock), 60, "guest agent")
    with GuestAgentClient(sock) as agent:
        agent.shutdown("reboot")  # as if someone ran `reboot` in the guest
    # Committed to the reboot (init runs its shutdown action), agent still answering.
    wait_until(lambda: "vmtask-guest: going down" in vm.console_log(), 30,
               "the guest to start going down", interval=0.1)
    ok(vm.guest_os.shutdown(timeout_s=60))
    assert vm.state is S.TurnedOff and qemu_pid(vmhost, name) is None
    assert vm.console_log().count(READY_MARKER) == 2  # it did reboot first
    ok(vm.delete())


def test_restart_without_a_boot_id_waits_for_the_agent_to_go_and_come_back(
        server: VirtualServer, vmhost: WorkerProcess, name: str) -> None:
    vm = guest_vm(server, name, agent=True, initrd="guest/initrd-noid.gz")
    ok(vm.startup())
    ok(vm.guest_os.restart(timeout_s=120))
    assert vm.console_log().count(READY_MARKER) == 2
    ok(vm.guest_os.shutdown(timeout_s=60))
    assert vm.state is S.TurnedOff and qemu_pid(vmhost, name) is None
    ok(vm.delete())


def test_a_guest_that_refuses_restart_and_shutdown_says_why(
        server: VirtualServer, name: str) -> None:
    """The real agent's error reply ends the task at once, with the agent's words."""
    vm = guest_vm(server, name, agent=True, initrd="guest/initrd-refuse.gz")
    ok(vm.startup())
    for task in (vm.guest_os.restart(timeout_s=60), vm.guest_os.shutdown(timeout_s=60)):
        assert task.wait_for_completion(120_000)
        snap = task.snapshot()
        assert (snap.result, snap.error) == (VMTaskResult.UnexpectedError, 0x8000FFFF), snap
        assert "child process has failed to shutdown" in snap.error_description, snap
        # Told at once, not after the whole timeout.
        assert snap.started is not None and snap.finished is not None
        assert snap.finished - snap.started < 30, snap
    assert vm.state is S.Running
    assert vm.console_log().count(READY_MARKER) == 1  # never rebooted
    ok(vm.turn_off())
    ok(vm.delete())


def test_guest_shutdown_by_acpi_without_an_agent(server: VirtualServer, name: str) -> None:
    vm = guest_vm(server, name, agent=False)
    ok(vm.startup())
    # Sent at once: presses before the guest's ACPI handler is up are lost and repeated.
    ok(vm.guest_os.shutdown(timeout_s=60))
    assert vm.state is S.TurnedOff
    with pytest.raises(errors.InvalidStateError):
        vm.guest_os.restart()  # it is off now
    ok(vm.delete())


def test_a_guest_that_ignores_shutdown_times_out_and_keeps_running(
    server: VirtualServer, name: str
) -> None:
    vm = server.create_virtual_machine(name, memory_mb=64)  # no OS: nobody hears ACPI
    ok(vm.startup())
    task = vm.guest_os.shutdown(timeout_s=3)
    assert task.wait_for_completion(60_000)
    assert (task.result, task.error) == (VMTaskResult.TimeOutError, 0x800705B4)
    assert vm.state is S.Running
    logoff = vm.guest_os.logoff()
    assert logoff.wait_for_completion(60_000)
    assert logoff.result is VMTaskResult.IllegalValueError
    ok(vm.turn_off())
    ok(vm.delete())


# -- the host's watch and reconciliation -------------------------------------------------


def test_a_vm_that_stops_by_itself_is_noticed(server: VirtualServer, vmhost: WorkerProcess,
                                              name: str) -> None:
    vm = guest_vm(server, name, agent=True)
    ok(vm.startup())
    # The guest powers itself off (as if a user ran poweroff inside it).
    from workers.engines.guest_agent import GuestAgentClient

    sock = vmhost.storage_root / "vms" / name / "qga.sock"
    wait_until(lambda: agent_answers(sock), 60, "guest agent")
    with GuestAgentClient(sock) as agent:
        agent.shutdown("powerdown")
    wait_until(lambda: vm.state is S.TurnedOff, 30, "the watcher to notice the power-off")
    # A crash (QEMU killed) is Invalid, not TurnedOff.
    crash = server.create_virtual_machine(name + "-c", memory_mb=64)
    ok(crash.startup())
    pid = qemu_pid(vmhost, crash.name)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: crash.state is S.Invalid, 30, "the watcher to notice the crash")
    assert not (vmhost.storage_root / "vms" / crash.name / "qmp.sock").exists()
    ok(crash.turn_off())  # the way out of Invalid
    assert crash.state is S.TurnedOff
    ok(crash.delete())
    ok(vm.delete())


def test_vms_survive_a_killed_worker_and_are_reconciled(
    vm_env: tuple[RedisServer, Path],
) -> None:
    redis, base = vm_env
    root = base / "recon"
    worker = WorkerProcess(redis.url, "recon", root, base, concurrency=1,
                           env={"VMTASK_HEARTBEAT_SECONDS": "2"}).start()
    server = VirtualServer(redis.url, host="recon", poll_interval=0.5)
    try:
        keep = server.create_virtual_machine("recon-keep", memory_mb=64)
        lost = server.create_virtual_machine("recon-lost", memory_mb=64)
        ok(keep.startup())
        ok(lost.startup())
        pid_keep = int((root / "vms" / "recon-keep" / "qemu.pid").read_text())
        worker.kill()
        # Once the host's heartbeat lapses its VMs are unknown: Invalid until it returns.
        wait_until(lambda: keep.state is S.Invalid, 30, "the lost host's VMs to be Invalid")
        # While no worker runs, one VM's QEMU dies too.
        os.kill(int((root / "vms" / "recon-lost" / "qemu.pid").read_text()), signal.SIGKILL)
        worker.start()
        assert keep.state is S.Running
        assert int((root / "vms" / "recon-keep" / "qemu.pid").read_text()) == pid_keep
        assert lost.state is S.Invalid
        ok(keep.pause())  # still controllable
        ok(keep.turn_off())
        ok(keep.delete())
        ok(lost.delete())  # an Invalid VM can be deleted
    finally:
        worker.stop()
        kill_leftover_qemu(root)


def test_no_qemu_is_left_behind(vmhost: WorkerProcess, server: VirtualServer) -> None:
    for vm in server.virtual_machines:
        if vm.host == "vmhost" and vm.state in (S.Running, S.Paused):
            ok(vm.turn_off())
    out = subprocess.run(["pgrep", "-f", str(vmhost.storage_root)], capture_output=True,
                         text=True).stdout
    assert out.split() == []
    leftovers: list[Any] = list((vmhost.storage_root / "vms").glob("*/qmp.sock"))
    assert leftovers == []
