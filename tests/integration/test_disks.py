"""Disk operations end to end: producer -> Redis -> worker -> qemu-img -> bytes on disk."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from api import HardDisk, VirtualServer, VMHardDiskType, VMTaskResult, errors
from api.protocol import hresults
from tests.helpers import assert_succeeded as done
from tests.helpers import big_image, qemu_io
from workers.devtools.sandbox import RedisServer, WorkerProcess, wait_until

MiB = 1 << 20


def test_create_each_kind_and_read_it_back(server: VirtualServer, root: Path,
                                           unique: str) -> None:
    done(server.create_fixed_virtual_hard_disk(f"{unique}/fixed.vhd", 16))
    done(server.create_dynamic_virtual_hard_disk(f"{unique}/dyn.vhdx", 64))
    done(server.create_differencing_virtual_hard_disk(f"{unique}/child.qcow2",
                                                      f"{unique}/fixed.vhd"))
    fixed = server.get_hard_disk(f"{unique}/fixed.vhd")
    assert isinstance(fixed, HardDisk)
    assert (fixed.type, fixed.size_in_guest, fixed.parent) == (VMHardDiskType.FixedSize,
                                                               16 * MiB, None)
    assert fixed.size_on_host >= 16 * MiB  # really allocated
    assert fixed.host_free_disk_space > 0
    dynamic = server.get_hard_disk(f"{unique}/dyn.vhdx")
    assert (dynamic.type, dynamic.size_in_guest) == (VMHardDiskType.Dynamic, 64 * MiB)
    assert dynamic.size_on_host < 16 * MiB  # sparse
    child = server.get_hard_disk(f"{unique}/child.qcow2")
    assert child.type is VMHardDiskType.Differencing and child.parent is not None
    assert child.parent.file == f"{unique}/fixed.vhd"
    assert child.file == f"{unique}/child.qcow2"


def test_convert_through_the_queue_keeps_the_bytes(server: VirtualServer, root: Path,
                                                   unique: str) -> None:
    source = root / unique / "src.qcow2"
    done(server.create_dynamic_virtual_hard_disk(f"{unique}/src.qcow2", 32))
    qemu_io(source, "qcow2", "write -P 0xab 0 1M", "write -P 0x5c 20M 2M")
    disk = server.get_hard_disk(f"{unique}/src.qcow2")
    task = disk.convert(f"{unique}/out.vhd", VMHardDiskType.FixedSize)
    assert task.is_cancelable and task.description.startswith("Converting")
    done(task)
    out = root / unique / "out.vhd"
    qemu_io(out, "vpc", "read -P 0xab 0 1M", "read -P 0x5c 20M 2M", "read -P 0 1M 19M")
    assert server.get_hard_disk(f"{unique}/out.vhd").type is VMHardDiskType.FixedSize
    back = server.get_hard_disk(f"{unique}/out.vhd").convert(f"{unique}/back.qcow2",
                                                             VMHardDiskType.Dynamic)
    done(back)
    subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(source),
                    str(root / unique / "back.qcow2")], check=True, capture_output=True)


def test_progress_of_a_large_convert_is_monotonic(server: VirtualServer, root: Path,
                                                  unique: str) -> None:
    big_image(root, f"{unique}/big.img", 384)
    task = server.get_hard_disk(f"{unique}/big.img").convert(f"{unique}/big.qcow2",
                                                             VMHardDiskType.Dynamic)
    seen: list[int] = []
    while not (snap := task.snapshot()).is_complete:
        seen.append(snap.percent_completed)
        task.wait_for_completion(20)
    assert snap.result is VMTaskResult.Success
    seen.append(snap.percent_completed)
    assert seen == sorted(seen) and seen[-1] == 100
    assert any(0 < p < 100 for p in seen), seen


def test_cancel_a_convert_leaves_no_trace(server: VirtualServer, root: Path,
                                          unique: str) -> None:
    big_image(root, f"{unique}/big.img", 512)
    task = server.get_hard_disk(f"{unique}/big.img").convert(f"{unique}/big.vhdx",
                                                             VMHardDiskType.FixedSize)
    wait_until(lambda: task.percent_completed > 0 or task.is_complete, 60, "progress")
    task.cancel()
    assert task.wait_for_completion(30_000)
    assert (task.result, task.error) == (VMTaskResult.Cancelled, hresults.E_ABORT)
    assert sorted(p.name for p in (root / unique).iterdir()) == ["big.img"]
    assert subprocess.run(["pgrep", "-f", f"{unique}/big.vhdx"]).returncode == 1


def test_merge_is_not_cancelable_and_merges_into_the_parent(
    server: VirtualServer, root: Path, unique: str
) -> None:
    done(server.create_dynamic_virtual_hard_disk(f"{unique}/base.qcow2", 16))
    qemu_io(root / unique / "base.qcow2", "qcow2", "write -P 0x11 0 4M")
    done(server.create_differencing_virtual_hard_disk(f"{unique}/top.qcow2",
                                                      f"{unique}/base.qcow2"))
    qemu_io(root / unique / "top.qcow2", "qcow2", "write -P 0x22 1M 1M")
    task = server.get_hard_disk(f"{unique}/top.qcow2").merge()
    assert task.is_cancelable is False
    with pytest.raises(errors.TaskNotCancelableError):
        task.cancel()
    done(task)
    qemu_io(root / unique / "base.qcow2", "qcow2", "read -P 0x11 0 1M", "read -P 0x22 1M 1M",
            "read -P 0x11 2M 2M")


def test_merge_to_collapses_a_three_level_chain(server: VirtualServer, root: Path,
                                                unique: str) -> None:
    done(server.create_fixed_virtual_hard_disk(f"{unique}/l0.vhd", 8))
    qemu_io(root / unique / "l0.vhd", "vpc", "write -P 0x01 0 8M")
    done(server.create_differencing_virtual_hard_disk(f"{unique}/l1.qcow2", f"{unique}/l0.vhd"))
    qemu_io(root / unique / "l1.qcow2", "qcow2", "write -P 0x02 2M 2M")
    done(server.create_differencing_virtual_hard_disk(f"{unique}/l2.qcow2",
                                                      f"{unique}/l1.qcow2"))
    qemu_io(root / unique / "l2.qcow2", "qcow2", "write -P 0x03 3M 1M")
    top = server.get_hard_disk(f"{unique}/l2.qcow2")
    assert top.parent is not None and top.parent.parent is not None
    assert top.parent.parent.file == f"{unique}/l0.vhd"
    done(top.merge_to(f"{unique}/flat.vhdx", VMHardDiskType.Dynamic))
    flat = server.get_hard_disk(f"{unique}/flat.vhdx")
    assert flat.parent is None and flat.size_in_guest == 8 * MiB
    qemu_io(root / unique / "flat.vhdx", "vhdx", "read -P 0x01 0 2M", "read -P 0x02 2M 1M",
            "read -P 0x03 3M 1M", "read -P 0x01 4M 4M")


def test_compact_through_the_queue(server: VirtualServer, root: Path, unique: str) -> None:
    done(server.create_dynamic_virtual_hard_disk(f"{unique}/c.qcow2", 64))
    qemu_io(root / unique / "c.qcow2", "qcow2", "write -P 0x7e 0 8M", "write -z 0 6M")
    before = server.get_hard_disk(f"{unique}/c.qcow2").size_on_host
    done(server.get_hard_disk(f"{unique}/c.qcow2").compact())
    after = server.get_hard_disk(f"{unique}/c.qcow2")
    assert after.size_on_host <= before
    qemu_io(root / unique / "c.qcow2", "qcow2", "read -P 0 0 6M", "read -P 0x7e 6M 2M")


# -- errors ----------------------------------------------------------------------------


def test_bad_arguments_are_refused_before_queueing(server: VirtualServer) -> None:
    escapes = [
        lambda: server.create_fixed_virtual_hard_disk("../escape.vhd", 1),
        lambda: server.create_fixed_virtual_hard_disk("/etc/evil.vhd", 1),
        lambda: server.get_hard_disk("a/../../b.vhd"),
    ]
    for case in escapes:  # leaving the root is ACCESS_DENIED wherever it is caught
        with pytest.raises(errors.InvalidArgumentError) as caught:
            case()
        assert caught.value.hresult == hresults.ACCESS_DENIED
    cases = [
        lambda: server.create_fixed_virtual_hard_disk("x.vmdk", 1),
        lambda: server.create_fixed_virtual_hard_disk("x.vhd", 0),
        lambda: server.create_fixed_virtual_hard_disk("x.vhd", 2041 * 1024),  # > 2040 GiB
        lambda: server.create_dynamic_virtual_hard_disk("x.vhd", True),  # type: ignore[arg-type]
        lambda: server.create_differencing_virtual_hard_disk("child.vhd", "p.vhd"),
    ]
    for case in cases:
        with pytest.raises(errors.InvalidArgumentError) as caught:
            case()
        assert caught.value.hresult == hresults.E_INVALIDARG


def test_a_size_beyond_vhd_max_is_refused_client_side_with_illegal_value_hresult(
    server: VirtualServer,
) -> None:
    with pytest.raises(errors.InvalidArgumentError, match="maximum"):
        server.create_dynamic_virtual_hard_disk("huge.vhd", 2041 * 1024)
    # vhdx allows it: the same size is accepted (and created sparse).
    done(server.create_dynamic_virtual_hard_disk("huge-ok.vhdx", 2041 * 1024))


@pytest.mark.parametrize(("make", "hresult"), [
    ("missing", hresults.FILE_NOT_FOUND),
    ("exists", hresults.FILE_EXISTS),
    ("corrupt", hresults.DISK_CORRUPT),
])
def test_disk_errors_carry_the_table_hresults(server: VirtualServer, root: Path, unique: str,
                                              make: str, hresult: int) -> None:
    (root / unique).mkdir(parents=True, exist_ok=True)
    if make == "missing":
        task = server.create_differencing_virtual_hard_disk(f"{unique}/c.qcow2",
                                                            f"{unique}/nope.qcow2")
    elif make == "exists":
        (root / unique / "taken.vhd").write_bytes(b"mine")
        task = server.create_dynamic_virtual_hard_disk(f"{unique}/taken.vhd", 1)
    else:
        (root / unique / "bad.qcow2").write_bytes(b"QFI\xfb" + os.urandom(4096))
        task = server.submit("vmtask.disk.convert", description="convert corrupt",
                             cancelable=True, kwargs={"path": f"{unique}/bad.qcow2",
                                                      "destination": f"{unique}/o.qcow2",
                                                      "disk_type": 0})
    assert task.wait_for_completion(60_000)
    assert (task.result, task.error) == (VMTaskResult.DiskRelatedError, hresult), \
        task.error_description
    if make == "exists":
        assert (root / unique / "taken.vhd").read_bytes() == b"mine"


def test_get_hard_disk_of_a_missing_file_raises_not_found(server: VirtualServer) -> None:
    with pytest.raises(errors.NotFoundError) as caught:
        server.get_hard_disk("no/such/disk.vhd")
    assert caught.value.hresult == hresults.FILE_NOT_FOUND


def test_a_symlink_out_of_the_root_is_refused_by_the_worker(
    server: VirtualServer, root: Path, unique: str, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / unique).mkdir(parents=True, exist_ok=True)
    (root / unique / "link").symlink_to(outside)
    task = server.create_dynamic_virtual_hard_disk(f"{unique}/link/x.qcow2", 1)
    assert task.wait_for_completion(30_000)
    assert (task.result, task.error) == (VMTaskResult.DiskRelatedError, hresults.ACCESS_DENIED)
    assert list(outside.iterdir()) == []


def test_disk_full_is_disk_related_0x80070070(spawn: object, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr!r}")
    try:
        redis: RedisServer = spawn("redis")  # type: ignore[operator]
        worker = WorkerProcess(redis.url, "full", small, tmp_path, concurrency=1).start()
        try:
            server = VirtualServer(redis.url, host="full")
            task = server.create_fixed_virtual_hard_disk("big.vhd", 64)
            assert task.wait_for_completion(60_000)
            assert (task.result, task.error) == (VMTaskResult.DiskRelatedError,
                                                 hresults.DISK_FULL)
            leftovers = [p.name for p in small.iterdir() if not p.name.startswith(".vmtask-")]
            assert leftovers == []
        finally:
            worker.stop()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_two_writers_of_one_file_conflict_clearly(server: VirtualServer, root: Path,
                                                  unique: str) -> None:
    big_image(root, f"{unique}/big.img", 512)
    disk = server.get_hard_disk(f"{unique}/big.img")
    first = disk.convert(f"{unique}/same.qcow2", VMHardDiskType.Dynamic)
    wait_until(lambda: first.percent_completed > 0 or first.is_complete, 60, "first running")
    second = disk.convert(f"{unique}/same.qcow2", VMHardDiskType.Dynamic)
    assert second.wait_for_completion(60_000)
    assert (second.result, second.error) == (VMTaskResult.DiskRelatedError,
                                             hresults.SHARING_VIOLATION), \
        second.error_description
    done(first)
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2",
                    str(root / unique / "big.img"), str(root / unique / "same.qcow2")],
                   check=True, capture_output=True)


def test_merging_a_parent_that_another_task_reads_is_refused(
    server: VirtualServer, root: Path, unique: str
) -> None:
    big_image(root, f"{unique}/base.img", 384)
    done(server.create_differencing_virtual_hard_disk(f"{unique}/top.qcow2",
                                                      f"{unique}/base.img"))
    reader = server.get_hard_disk(f"{unique}/base.img").convert(f"{unique}/copy.qcow2",
                                                                VMHardDiskType.Dynamic)
    wait_until(lambda: reader.percent_completed > 0 or reader.is_complete, 60, "reader")
    merge = server.get_hard_disk(f"{unique}/top.qcow2").merge()
    assert merge.wait_for_completion(60_000)
    done(reader)
    reader_end, merge_end = reader.snapshot().finished, merge.snapshot().finished
    assert reader_end is not None and merge_end is not None
    assert merge_end < reader_end, "the reader ended first: the image is too small to race"
    assert (merge.result, merge.error) == (VMTaskResult.DiskRelatedError,
                                           hresults.SHARING_VIOLATION)


def test_stale_temporaries_are_removed_when_the_worker_restarts(
    spawn: object, tmp_path: Path
) -> None:
    redis: RedisServer = spawn("redis")  # type: ignore[operator]
    worker: WorkerProcess = spawn("worker", redis_url=redis.url, host="tmp1")  # type: ignore[operator]
    server = VirtualServer(redis.url, host="tmp1")
    big_image(worker.storage_root, "big.img", 512)
    task = server.get_hard_disk("big.img").convert("out.qcow2", VMHardDiskType.Dynamic)
    wait_until(lambda: task.percent_completed > 0, 60, "progress")
    temps = [p for p in worker.storage_root.iterdir() if p.name.endswith(".tmp")]
    assert temps, list(worker.storage_root.iterdir())
    worker.kill()
    worker.start()
    assert [p.name for p in worker.storage_root.iterdir() if not p.name.startswith(".vmtask")] \
        == ["big.img"]


def test_host_drive_disks_honour_the_allow_list_and_stay_read_only(
    spawn: object, tmp_path: Path
) -> None:
    devices = tmp_path / "devices"
    devices.mkdir()
    device = devices / "sdx"
    device.write_bytes(b"\x5a" * (4 * MiB))
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\x00" * MiB)
    redis: RedisServer = spawn("redis")  # type: ignore[operator]
    spawn("worker", redis_url=redis.url, host="hd",  # type: ignore[operator]
          env={"VMTASK_HOST_DRIVE_ALLOW": f"{devices}/"})
    server = VirtualServer(redis.url, host="hd")
    refused = server.create_host_drive_virtual_hard_disk("no.qcow2", str(secret))
    assert refused.wait_for_completion(30_000)
    assert (refused.result, refused.error) == (VMTaskResult.DiskRelatedError,
                                               hresults.ACCESS_DENIED)
    done(server.create_host_drive_virtual_hard_disk("hd.qcow2", str(device)))
    disk = server.get_hard_disk("hd.qcow2")
    assert (disk.type, disk.host_drive, disk.size_in_guest) == (VMHardDiskType.HostDrive,
                                                                str(device), 4 * MiB)
    image = tmp_path / "storage-hd" / "hd.qcow2"
    qemu_io(image, "qcow2", "read -P 0x5a 0 4M", "write -P 0x11 0 1M", "read -P 0x11 0 1M")
    assert device.read_bytes() == b"\x5a" * (4 * MiB)  # the guest's write stayed in the qcow2
    with pytest.raises(errors.InvalidArgumentError):
        server.create_host_drive_virtual_hard_disk("x.qcow2", "relative/dev")
