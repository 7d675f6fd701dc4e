"""Copying a disk between hosts: alpha serves over NBD, beta pulls (separate roots)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from api import VirtualServer, VMHardDiskType, VMTaskResult, errors
from api.protocol import hresults, keys
from tests.cli_runs import run_cli
from tests.helpers import assert_succeeded as done
from tests.helpers import big_image, digest, qemu_io, serve_task_of
from workers.devtools.sandbox import RedisServer, WorkerProcess, wait_until

MiB = 1 << 20
pytestmark = pytest.mark.slow


def test_heartbeat_advertises_the_transfer_address(both: VirtualServer) -> None:
    status = both.host_status()
    for host in ("alpha", "beta"):
        assert status[host]["transfer_address"] == "127.0.0.1"
        low, high = status[host]["transfer_ports"]
        assert 1024 <= low <= high <= 65535


def test_copy_a_differencing_chain_to_another_host(both: VirtualServer, root: Path,
                                                   beta: WorkerProcess, unique: str) -> None:
    done(both.create_dynamic_virtual_hard_disk(f"{unique}/base.vhd", 32))
    qemu_io(root / unique / "base.vhd", "vpc", "write -P 0x11 0 2M", "write -P 0x22 20M 1M")
    done(both.create_differencing_virtual_hard_disk(f"{unique}/top.qcow2", f"{unique}/base.vhd"))
    qemu_io(root / unique / "top.qcow2", "qcow2", "write -P 0x33 1M 2M")
    before = {p.name: digest(p) for p in (root / unique).iterdir()}

    task = both.get_hard_disk(f"{unique}/top.qcow2").copy_to("beta", f"{unique}/copy.vhdx")
    assert task.host == "beta" and task.is_cancelable
    done(task)

    copy = beta.storage_root / unique / "copy.vhdx"
    assert sorted(p.name for p in copy.parent.iterdir()) == ["copy.vhdx"]
    subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "vhdx",
                    str(root / unique / "top.qcow2"), str(copy)], check=True,
                   capture_output=True)
    qemu_io(copy, "vhdx", "read -P 0x11 0 1M", "read -P 0x33 1M 2M", "read -P 0x22 20M 1M")
    assert {p.name: digest(p) for p in (root / unique).iterdir()} == before
    disk = both.get_hard_disk(f"{unique}/copy.vhdx", host="beta")
    assert (disk.type, disk.parent, disk.size_in_guest) == (VMHardDiskType.Dynamic, None,
                                                            32 * MiB)
    assert task.snapshot().output["chain"][0]["file"] == f"{unique}/copy.vhdx"
    serve = both.get_task(serve_task_of(both, task.id))
    assert serve.wait_for_completion(10_000) and serve.result is VMTaskResult.Success
    assert serve.snapshot().host == "alpha"
    assert not both.redis.keys(keys.transfer("*"))


def test_a_fixed_disk_stays_fixed(both: VirtualServer, root: Path, beta: WorkerProcess,
                                  unique: str) -> None:
    done(both.create_fixed_virtual_hard_disk(f"{unique}/fixed.vhd", 16))
    qemu_io(root / unique / "fixed.vhd", "vpc", "write -P 0x44 3M 1M")
    done(both.get_hard_disk(f"{unique}/fixed.vhd").copy_to("beta", f"{unique}/fixed.vhd"))
    disk = both.get_hard_disk(f"{unique}/fixed.vhd", host="beta")
    assert (disk.type, disk.size_in_guest) == (VMHardDiskType.FixedSize, 16 * MiB)
    assert disk.size_on_host >= 16 * MiB
    qemu_io(beta.storage_root / unique / "fixed.vhd", "vpc", "read -P 0x44 3M 1M")


def test_an_existing_destination_is_refused_before_anything_moves(
        both: VirtualServer, beta: WorkerProcess, unique: str) -> None:
    done(both.create_dynamic_virtual_hard_disk(f"{unique}/a.qcow2", 8))
    existing = beta.storage_root / unique / "a.qcow2"
    existing.parent.mkdir(parents=True, exist_ok=True)
    existing.write_bytes(b"keep me")
    task = both.get_hard_disk(f"{unique}/a.qcow2").copy_to("beta", f"{unique}/a.qcow2")
    assert task.wait_for_completion(30_000)
    assert (task.result, task.error) == (VMTaskResult.DiskRelatedError, hresults.FILE_EXISTS)
    assert existing.read_bytes() == b"keep me"
    serve = both.get_task(serve_task_of(both, task.id))
    assert serve.wait_for_completion(10_000)
    assert serve.snapshot().output == {"served": False}  # it never exported anything


def test_bad_destinations_are_refused_before_anything_is_queued(
        both: VirtualServer, unique: str) -> None:
    done(both.create_dynamic_virtual_hard_disk(f"{unique}/a.qcow2", 8))
    disk = both.get_hard_disk(f"{unique}/a.qcow2")
    queued = both.redis.zcard(keys.RECENT_TASKS)
    with pytest.raises(errors.InvalidArgumentError):
        disk.copy_to("beta", "../escape.qcow2")
    with pytest.raises(errors.InvalidArgumentError):
        disk.copy_to("beta", f"{unique}/a.unknown")
    with pytest.raises(errors.HostUnavailableError):
        disk.copy_to("gamma", f"{unique}/a.qcow2")
    assert both.redis.zcard(keys.RECENT_TASKS) == queued


def test_a_source_failure_ends_the_copy_with_its_error(
        both: VirtualServer, root: Path, beta: WorkerProcess, unique: str) -> None:
    done(both.create_dynamic_virtual_hard_disk(f"{unique}/gone.qcow2", 8))
    disk = both.get_hard_disk(f"{unique}/gone.qcow2")
    (root / unique / "gone.qcow2").unlink()
    task = disk.copy_to("beta", f"{unique}/gone.qcow2")
    assert task.wait_for_completion(30_000)
    assert (task.result, task.error) == (VMTaskResult.DiskRelatedError,
                                         hresults.FILE_NOT_FOUND)
    assert "alpha" in task.error_description
    assert not (beta.storage_root / unique).exists() or not any(
        (beta.storage_root / unique).iterdir())


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_cancel_mid_copy_leaves_nothing_on_the_destination(
        both: VirtualServer, root: Path, beta: WorkerProcess, unique: str) -> None:
    big_image(root, f"{unique}/big.img", 512)
    before = digest(root / unique / "big.img")
    task = both.get_hard_disk(f"{unique}/big.img").copy_to("beta", f"{unique}/big.vhdx")
    wait_until(lambda: task.percent_completed > 0 or task.is_complete, 60, "progress")
    offers = both.redis.keys(keys.transfer("*"))
    assert len(offers) == 1
    port = int(both.redis.hget(offers[0], "port") or 0)
    export_name = str(both.redis.hget(offers[0], "export"))
    task.cancel()
    assert task.wait_for_completion(30_000)
    assert (task.result, task.error) == (VMTaskResult.Cancelled, hresults.E_ABORT)
    assert export_name not in task.error_description
    assert list((beta.storage_root / unique).iterdir()) == []
    serve = both.get_task(serve_task_of(both, task.id))
    assert serve.wait_for_completion(10_000)
    assert not listening(port)
    assert not both.redis.exists(offers[0])
    assert digest(root / unique / "big.img") == before


def test_cli_disk_copy(both: VirtualServer, root: Path, beta: WorkerProcess,
                       redis_server: RedisServer, unique: str) -> None:
    done(both.create_dynamic_virtual_hard_disk(f"{unique}/a.qcow2", 8))
    qemu_io(root / unique / "a.qcow2", "qcow2", "write -P 0x66 0 1M")
    run = run_cli("--url", redis_server.url, "--host", "alpha", "disk", "copy",
                  f"{unique}/a.qcow2", "beta", f"{unique}/b.vhd", "--json")
    assert run.code == 0, run
    doc = run.json()
    assert (doc["result"], doc["percent_completed"], doc["disk"]["file"]) == (
        "Success", 100, f"{unique}/b.vhd")
    qemu_io(beta.storage_root / unique / "b.vhd", "vpc", "read -P 0x66 0 1M")
