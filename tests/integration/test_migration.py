"""Cold move of a VM between hosts alpha and beta (separate storage roots)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from api import VirtualServer, VMTaskResult, VMVMState, errors
from api.protocol import hresults, keys
from tests.cli_runs import cli_env
from tests.helpers import assert_succeeded as done
from tests.helpers import qemu_io, serve_task_of
from workers.devtools.sandbox import WorkerProcess

pytestmark = pytest.mark.slow


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_turned_off_vm_moves_with_its_disks(both: VirtualServer, root: Path,
                                              beta: WorkerProcess, unique: str) -> None:
    done(both.create_dynamic_virtual_hard_disk(f"{unique}/base.vhd", 16))
    qemu_io(root / unique / "base.vhd", "vpc", "write -P 0x21 0 1M")
    done(both.create_differencing_virtual_hard_disk(f"{unique}/d.qcow2", f"{unique}/base.vhd"))
    qemu_io(root / unique / "d.qcow2", "qcow2", "write -P 0x42 1M 1M")
    source_digests = {p.name: digest(p) for p in (root / unique).iterdir()}
    vm = both.create_virtual_machine(unique, memory_mb=64, disks=[f"{unique}/d.qcow2"],
                                     host="alpha", network=None)
    assert both.redis.sismember(keys.host_vms("alpha"), unique)  # each host's VM set
    task = vm.migrate("beta")
    assert task.host == "beta" and task.is_cancelable
    done(task)
    assert vm.state is VMVMState.TurnedOff and vm.host == "beta"
    assert both.redis.hget(keys.vm_record(unique), "host") == "beta"
    # The move's compare-and-set moved it between the hosts' VM sets too.
    assert not both.redis.sismember(keys.host_vms("alpha"), unique)
    assert both.redis.sismember(keys.host_vms("beta"), unique)
    assert {p.name: digest(p) for p in (beta.storage_root / unique).iterdir()} == source_digests
    qemu_io(beta.storage_root / unique / "d.qcow2", "qcow2", "read -P 0x21 0 1M",
            "read -P 0x42 1M 1M")
    # The source task removes its copies once the record names beta.
    out = both.get_task(serve_task_of(both, task.id))
    assert out.wait_for_completion(10_000) and out.snapshot().output == {"moved": True}
    assert not (root / unique / "d.qcow2").exists()  # the VM's own disk left the source
    assert (root / unique / "base.vhd").exists()  # a parent may be shared: it stays
    assert not (root / "vms" / unique).exists()
    assert out.snapshot().host == "alpha"
    done(vm.delete())  # operations now go to beta
    assert not (beta.storage_root / "vms" / unique).exists()
    assert not both.redis.sismember(keys.host_vms("beta"), unique)


def test_the_move_completes_only_once_the_source_has_let_go(
        both: VirtualServer, root: Path, beta: WorkerProcess, unique: str) -> None:
    """Issue 21, point 4: at the instant wait_for_completion returns Success, the
    source holds nothing of the VM (no disk, no VM folder) and its task has ended."""
    done(both.create_dynamic_virtual_hard_disk(f"{unique}/d.qcow2", 8))
    vm = both.create_virtual_machine(unique, memory_mb=64, disks=[f"{unique}/d.qcow2"],
                                     host="alpha", network=None)
    task = vm.migrate("beta")
    assert task.wait_for_completion(-1)
    left = [str(p) for p in (root / unique / "d.qcow2", root / "vms" / unique) if p.exists()]
    source = both.get_task(serve_task_of(both, task.id)).snapshot()
    assert task.result is VMTaskResult.Success, task.error_description
    assert left == []
    assert source.is_complete and source.output == {"moved": True}
    assert task.snapshot().output == {"host": "beta", "files": 1}
    assert (beta.storage_root / unique / "d.qcow2").exists()
    done(vm.delete())


def test_a_file_the_source_cannot_remove_is_named_in_the_result(
        both: VirtualServer, root: Path, beta: WorkerProcess, unique: str) -> None:
    """The move happened (the record names beta, the files are there): Success, with
    a warning and the leftover named in the output, in the source task's too."""
    done(both.create_dynamic_virtual_hard_disk(f"{unique}/d.qcow2", 8))
    stuck = root / unique / "d.qcow2"
    # An immutable file: even root cannot unlink it (EPERM).
    if subprocess.run(["chattr", "+i", str(stuck)], capture_output=True,
                      check=False).returncode != 0:
        pytest.skip("chattr +i is not supported on the storage root's file system")
    try:
        vm = both.create_virtual_machine(unique, memory_mb=64, disks=[f"{unique}/d.qcow2"],
                                         host="alpha", network=None)
        task = vm.migrate("beta")
        assert task.wait_for_completion(-1)
        snap = task.snapshot()
        assert snap.result is VMTaskResult.Success, snap.error_description
        assert snap.output["left_on_source"] == [f"{unique}/d.qcow2: Operation not permitted"]
        assert "alpha could not remove" in snap.output["warning"]
        assert f"{unique}/d.qcow2" in snap.output["warning"]
        source = both.get_task(serve_task_of(both, task.id)).snapshot()
        assert source.output == {"moved": True, "left_on_source": snap.output["left_on_source"]}
        assert both.redis.hget(keys.vm_record(unique), "host") == "beta"
        assert (beta.storage_root / unique / "d.qcow2").exists()
        assert stuck.exists() and not (root / "vms" / unique).exists()
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=False)
    done(vm.delete())


def test_a_clash_on_the_destination_leaves_the_vm_where_it_was(
        both: VirtualServer, root: Path, beta: WorkerProcess, unique: str) -> None:
    done(both.create_dynamic_virtual_hard_disk(f"{unique}/d.qcow2", 8))
    before = digest(root / unique / "d.qcow2")
    clash = beta.storage_root / unique / "d.qcow2"
    clash.parent.mkdir(parents=True, exist_ok=True)
    clash.write_bytes(b"mine")
    vm = both.create_virtual_machine(unique, memory_mb=64, disks=[f"{unique}/d.qcow2"],
                                     host="alpha", network=None)
    task = vm.migrate("beta")
    assert task.wait_for_completion(60_000)
    assert (task.result, task.error) == (VMTaskResult.DiskRelatedError, hresults.FILE_EXISTS)
    out = both.get_task(serve_task_of(both, task.id))
    assert out.wait_for_completion(10_000) and out.snapshot().output == {"moved": False}
    assert vm.host == "alpha" and vm.state is VMVMState.TurnedOff
    assert digest(root / unique / "d.qcow2") == before and clash.read_bytes() == b"mine"
    assert not (beta.storage_root / "vms" / unique).exists()
    done(vm.delete())


def test_a_bad_migrate_is_refused_before_anything_is_queued(
        both: VirtualServer, unique: str) -> None:
    vm = both.create_virtual_machine(unique, memory_mb=64, host="alpha", network=None)
    with pytest.raises(errors.InvalidArgumentError):
        vm.migrate("alpha")
    with pytest.raises(errors.HostUnavailableError):
        vm.migrate("gamma")
    done(vm.delete())


def test_the_cli_moves_a_vm(both: VirtualServer, beta: WorkerProcess,
                            unique: str) -> None:
    both.create_virtual_machine(unique, memory_mb=64, host="alpha", network=None)
    moved = subprocess.run(
        [sys.executable, "-m", "api.cli", "--url", both.url, "--json", "vm", "migrate",
         unique, "beta"], env=cli_env(), capture_output=True, text=True, timeout=120,
        check=False)
    assert moved.returncode == 0, moved.stderr
    document = json.loads(moved.stdout)
    assert document["result"] == "Success" and document["vm"]["host"] == "beta"
    refused = subprocess.run(
        [sys.executable, "-m", "api.cli", "--url", both.url, "vm", "migrate", unique, "beta"],
        env=cli_env(), capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 2, refused.stderr  # already there: refused before queueing
    done(both.find_virtual_machine(unique).delete())  # type: ignore[union-attr]
