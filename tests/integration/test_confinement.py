"""Nothing leaves the storage root: escapes by name, by symlink and by backing file.

Every escape ends ACCESS_DENIED 0x80070005: `InvalidArgumentError` carrying it when
the client can tell (``..``, absolute), a DiskRelatedError task otherwise, and
nothing outside the root is read or written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from api import HardDisk, VirtualServer, VMHardDiskType, VMTask, VMTaskResult, VMVMState, errors
from api.protocol import hresults
from tests.helpers import assert_succeeded as ok
from tests.helpers import pids_of, qemu_io
from workers.devtools.sandbox import RedisServer, WorkerProcess, wait_until
from workers.devtools.tinyguest import build_tiny_guest
from workers.engines import beneath
from workers.engines.beneath import open_beneath
from workers.failures import DiskError

MiB = 1 << 20


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def denied(task: VMTask) -> None:
    assert task.wait_for_completion(60_000)
    snap = task.snapshot()
    assert (snap.result, snap.error) == (VMTaskResult.DiskRelatedError, hresults.ACCESS_DENIED), \
        snap.error_description


@pytest.fixture
def here(root: Path, request: pytest.FixtureRequest) -> Path:
    """A directory of the alpha root for this test alone."""
    directory = root / request.node.name.replace("[", "-").replace("]", "")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A raw image outside the root whose bytes must never change or leak."""
    path = tmp_path / "outside" / "secret.raw"
    path.parent.mkdir()
    path.write_bytes(b"OUTSIDE!" * (MiB // 8))
    return path


def plant(here: Path, outside: Path, how: str) -> str:
    """A qcow2 in the root whose backing name leads out of it; returns its root path."""
    planted = here / "planted.qcow2"
    if how == "absolute":
        backing = str(outside)
    elif how == "relative":
        backing = os.path.relpath(outside, here)
    elif how == "symlinked-dir":
        (here / "door").symlink_to(outside.parent)
        backing = f"door/{outside.name}"
    elif how == "json":
        backing = "json:" + json.dumps({"driver": "raw", "file": {"driver": "file",
                                                                  "filename": str(outside)}})
    else:  # a protocol: qemu would open a network connection
        backing = "nbd:127.0.0.1:9"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(planted), "1M"], check=True)
    qemu_io(planted, "qcow2", "write -P 0x61 0 4k")  # the overlay's own data
    # -u: record the name without opening it, as a hand-made image would.
    subprocess.run(["qemu-img", "rebase", "-q", "-u", "-f", "qcow2", "-b", backing, "-F", "raw",
                    str(planted)], check=True)
    return f"{here.name}/planted.qcow2"


PLANTS = ["absolute", "relative", "symlinked-dir", "json", "protocol"]


def handle(server: VirtualServer, path: str, host: str = "alpha") -> HardDisk:
    """What a client holds when the file was swapped after it read the disk."""
    parent = HardDisk(server=server, host=host, file="base.raw", type=VMHardDiskType.FixedSize,
                      format="raw", size_in_guest=MiB, size_on_host=MiB,
                      host_free_disk_space=0, host_drive=None, parent=None)
    return HardDisk(server=server, host=host, file=path, type=VMHardDiskType.Differencing,
                    format="qcow2", size_in_guest=MiB, size_on_host=0,
                    host_free_disk_space=0, host_drive=None, parent=parent)


@pytest.mark.parametrize("how", PLANTS)
def test_a_planted_backing_file_is_refused_and_the_outside_is_untouched(
    server: VirtualServer, here: Path, outside: Path, how: str
) -> None:
    path = plant(here, outside, how)
    before = sha256(outside)
    with pytest.raises(errors.VMTaskError) as caught:
        server.get_hard_disk(path)
    assert caught.value.hresult == hresults.ACCESS_DENIED, caught.value
    disk = handle(server, path)
    denied(disk.convert(f"{here.name}/copy.raw", VMHardDiskType.Dynamic))
    denied(disk.merge_to(f"{here.name}/merged.qcow2", VMHardDiskType.FixedSize))
    denied(disk.merge())
    denied(disk.compact())
    denied(disk.resize(2))
    denied(server.create_differencing_virtual_hard_disk(f"{here.name}/child.qcow2", path))
    assert sha256(outside) == before
    assert not (here / "copy.raw").exists() and not (here / "merged.qcow2").exists()
    assert not (here / "child.qcow2").exists()
    assert json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", "-U", "-f", "qcow2", str(here / "planted.qcow2")],
        check=True, capture_output=True, text=True).stdout)["virtual-size"] == MiB  # not grown
    # Not merged anywhere: the overlay still holds its data (read without its backing).
    spec = json.dumps({"driver": "qcow2", "backing": None,
                       "file": {"driver": "file", "filename": str(here / "planted.qcow2")}})
    read = subprocess.run(["qemu-io", "-c", "read -P 0x61 0 4k", f"json:{spec}"], check=True,
                          capture_output=True, text=True)
    assert "fail" not in read.stdout.lower(), read.stdout


def test_a_planted_vm_disk_never_reaches_qemu(server: VirtualServer, here: Path,
                                              outside: Path) -> None:
    path = plant(here, outside, "absolute")
    before = sha256(outside)
    for undoable in (False, True):
        vm = server.create_virtual_machine(f"{here.name[-40:]}-{int(undoable)}", memory_mb=32,
                                           disks=[path], undoable=undoable)
        denied(vm.startup())
        assert vm.state.name == "TurnedOff"
        vm.delete().wait_for_completion(30_000)
    assert sha256(outside) == before


def test_a_chain_inside_the_root_still_works_through_descriptors(
    server: VirtualServer, here: Path
) -> None:
    """The pinned chain is the real chain: a relative backing name two levels deep."""
    base = here / "base.raw"
    base.write_bytes(b"\0" * MiB)
    qemu_io(base, "raw", "write -P 0x11 0 64k")
    (here / "sub").mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "../base.raw", "-F", "raw",
                    str(here / "sub" / "mid.qcow2")], check=True)
    qemu_io(here / "sub" / "mid.qcow2", "qcow2", "write -P 0x22 64k 64k")
    disk = server.get_hard_disk(f"{here.name}/sub/mid.qcow2")
    assert disk.parent is not None and disk.parent.file == f"{here.name}/base.raw"
    task = disk.convert(f"{here.name}/flat.raw", VMHardDiskType.Dynamic)
    assert task.wait_for_completion(60_000) and task.result is VMTaskResult.Success
    qemu_io(here / "flat.raw", "raw", "read -P 0x11 0 64k", "read -P 0x22 64k 64k")
    task = disk.merge()
    assert task.wait_for_completion(60_000) and task.result is VMTaskResult.Success
    qemu_io(base, "raw", "read -P 0x22 64k 64k")


ESCAPES: dict[str, Callable[[Path, Path], str]] = {}


def _symlinked_dir(here: Path, outside: Path) -> str:
    (here / "door").symlink_to(outside.parent)
    return f"{here.name}/door/{outside.name}"


def _symlinked_file(here: Path, outside: Path) -> str:
    (here / "file.raw").symlink_to(outside)
    return f"{here.name}/file.raw"


def _dangling(here: Path, outside: Path) -> str:
    (here / "dangling.raw").symlink_to(outside.parent / "nothing-yet.raw")
    return f"{here.name}/dangling.raw"


@pytest.mark.parametrize("make", [_symlinked_dir, _symlinked_file, _dangling],
                         ids=["symlinked-dir", "symlinked-file", "dangling"])
def test_every_symlink_escape_is_access_denied_by_the_worker(
    server: VirtualServer, here: Path, outside: Path, make: Callable[[Path, Path], str]
) -> None:
    path = make(here, outside)
    before = sha256(outside)
    with pytest.raises(errors.VMTaskError) as caught:
        server.get_hard_disk(path)
    assert caught.value.hresult == hresults.ACCESS_DENIED
    denied(server.create_dynamic_virtual_hard_disk(path, 1))
    denied(server.create_differencing_virtual_hard_disk(f"{here.name}/c.qcow2", path))
    assert sha256(outside) == before
    assert sorted(p.name for p in outside.parent.iterdir()) == [outside.name]


@pytest.mark.parametrize("path", ["../x.raw", "a/../../x.raw", "/etc/x.raw"])
def test_name_escapes_are_access_denied_at_the_client_and_at_the_worker(
    server: VirtualServer, path: str
) -> None:
    with pytest.raises(errors.InvalidArgumentError) as caught:
        server.create_dynamic_virtual_hard_disk(path, 1)
    assert caught.value.hresult == hresults.ACCESS_DENIED
    # A producer that skips the client's check meets the same rule at the worker.
    denied(server.submit("vmtask.disk.create_dynamic", description="raw escape",
                         cancelable=True, kwargs={"path": path, "size_bytes": MiB}))


@pytest.mark.parametrize("kernel", ["openat2", "walk"])
def test_open_beneath_refuses_a_directory_swapped_for_a_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: str
) -> None:
    """The swap window: the path was checked, then a directory became a symlink."""
    if kernel == "walk":  # as on a kernel before 5.6, or under a seccomp filter
        monkeypatch.setattr(beneath, "_openat2_missing", True)
    else:
        root_fd = os.open(tmp_path, os.O_PATH)
        (tmp_path / "probe").write_text("")
        fd = beneath._openat2(root_fd, "probe", os.O_RDONLY)
        os.close(root_fd)
        assert fd is not None, "openat2 is missing on this kernel"
        os.close(fd)
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_text("in")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "f").write_text("out")
    checked = root / "d" / "f"
    os.close(open_beneath(root, checked))
    (root / "d").rename(root / "d.old")
    (root / "d").symlink_to(tmp_path / "out")
    with pytest.raises(DiskError) as caught:
        open_beneath(root, checked)
    assert caught.value.hresult == hresults.ACCESS_DENIED
    (root / "d.old" / "f").unlink()
    (root / "d.old" / "f").symlink_to(tmp_path / "out" / "f")
    with pytest.raises(DiskError):
        open_beneath(root, root / "d.old" / "f")


# -- the windows between a check and qemu's open --------------------------------------
#
# A worker whose qemu-img and qemu-system-x86_64 are wrappers: when a test leaves a
# plan, the wrapper swaps the named files for symlinks leading out of the root just
# before it runs the real binary (after the worker checked and opened the files,
# before qemu opens anything), and swaps them back once the binary has returned
# (for QEMU: once it has initialised, disks opened and kernel loaded).  Each
# wrapper logs its command lines and the names it swapped.

WRAPPER = """#!/bin/sh
log="{control}/{tool}.log"
plan="{control}/{tool}.plan"
echo "$*" >> "$log"
swapped=""
case " $* " in {triggers})
  if [ -f "$plan" ]; then
    mv "$plan" "$plan.running"
    while read -r name target; do mv "$name" "$name.checked"; ln -s "$target" "$name"; done \\
      < "$plan.running"
    swapped=1
  fi;;
esac
{real} "$@"
status=$?
if [ -n "$swapped" ]; then
  while read -r name target; do
    rm "$name"; mv "$name.checked" "$name"; echo "swapped $name" >> "$log"
  done < "$plan.running"
  rm "$plan.running"
fi
exit $status
"""


@pytest.fixture(scope="module")
def swapper(redis_server: RedisServer, session_dir: Path) -> Iterator[WorkerProcess]:
    control = session_dir / "swap-control"
    bin_dir = control / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for tool, triggers in (("qemu-img", '*" create "*|*" convert "*'),
                           ("qemu-system-x86_64", '*" -daemonize "*')):
        real = shutil.which(tool)
        assert real is not None
        (bin_dir / tool).write_text(WRAPPER.format(control=control, tool=tool,
                                                   triggers=triggers, real=real))
        (bin_dir / tool).chmod(0o755)
    (control / "devices").mkdir(exist_ok=True)
    worker = WorkerProcess(redis_server.url, "swap", session_dir / "swap", session_dir,
                           concurrency=1, env={"PATH": f"{bin_dir}:{os.environ['PATH']}",
                                               "VMTASK_HOST_DRIVE_ALLOW": f"{control}/devices/"})
    worker.start()
    guest = build_tiny_guest()
    (worker.storage_root / "guest").mkdir(parents=True, exist_ok=True)
    shutil.copy(guest.kernel, worker.storage_root / "guest" / "vmlinuz")
    shutil.copy(guest.initrd, worker.storage_root / "guest" / "initrd.gz")
    yield worker
    worker.stop()
    for pid in pids_of(str(worker.storage_root)):
        os.kill(pid, signal.SIGKILL)


def plan_swap(worker: WorkerProcess, tool: str, swaps: dict[Path, Path]) -> None:
    control = worker.storage_root.parent / "swap-control"
    (control / f"{tool}.plan").write_text("".join(f"{a} {b}\n" for a, b in swaps.items()))


def tool_log(worker: WorkerProcess, tool: str) -> list[str]:
    log = worker.storage_root.parent / "swap-control" / f"{tool}.log"
    return log.read_text().splitlines() if log.exists() else []


def inodes_open_by(pid: int) -> set[tuple[int, int]]:
    found = set()
    with contextlib.suppress(OSError):
        for entry in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                st = os.stat(entry.path)
                found.add((st.st_dev, st.st_ino))
    return found


def holders(wanted: tuple[int, int]) -> set[int]:
    """Every process with a descriptor of that inode."""
    return {int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and wanted in inodes_open_by(int(p.name))}


def inode(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


@pytest.fixture
def swap_server(redis_server: RedisServer, swapper: WorkerProcess) -> Iterator[VirtualServer]:
    with VirtualServer(redis_server.url, host="swap", poll_interval=0.5) as vs:
        yield vs


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    """Outside the root, and opening it for reading blocks until someone writes."""
    path = tmp_path / "fifo-outside"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("undoable", [False, True], ids=["plain", "undoable"])
def test_files_swapped_after_the_check_never_reach_qemu(
    swap_server: VirtualServer, swapper: WorkerProcess, outside: Path, fifo: Path,
    undoable: bool
) -> None:
    """Disk, kernel and initrd become symlinks out of the root after the worker
    checked them: QEMU still runs on the checked inodes, and never opens the names
    (the kernel and initrd names lead to a FIFO, which would block QEMU's start)."""
    root = swapper.storage_root
    name = f"sw{int(undoable)}"
    disk = root / f"{name}.raw"
    disk.write_bytes(b"\0" * MiB)
    checked = inode(disk)
    swaps = {disk: outside, root / "guest" / "vmlinuz": fifo, root / "guest" / "initrd.gz": fifo}
    before = sha256(outside)
    vm = swap_server.create_virtual_machine(
        name, memory_mb=128, disks=[disk.name], undoable=undoable, network=None,
        kernel="guest/vmlinuz", initrd="guest/initrd.gz", append="console=ttyS0 panic=-1")

    def start_swapped() -> None:
        runs = len(tool_log(swapper, "qemu-system-x86_64"))
        plan_swap(swapper, "qemu-system-x86_64", swaps)
        ok(vm.startup(), 90_000)
        assert vm.state is VMVMState.Running
        assert sorted(tool_log(swapper, "qemu-system-x86_64")[runs:])[-3:] == sorted(
            f"swapped {path}" for path in swaps)
        pid = int((root / "vms" / name / "qemu.pid").read_text())
        held = inodes_open_by(pid)
        assert checked in held and inode(outside) not in held
        # The descriptors went to QEMU alone: the worker closed its own, and no other
        # process inherited one.
        assert holders(checked) == {pid}

    try:
        start_swapped()
        wait_until(lambda: "Linux version" in vm.console_log(), 60, "the checked kernel to boot",
                   interval=0.5)
        if not undoable:  # a restore opens its files by descriptor too
            ok(vm.save(), 90_000)
            start_swapped()
        ok(vm.turn_off())
    finally:
        if vm.state in (VMVMState.Running, VMVMState.Paused):
            vm.turn_off().wait_for_completion(60_000)
        vm.delete().wait_for_completion(30_000)
    assert sha256(outside) == before


def test_a_differencing_disk_takes_its_size_from_the_checked_parent(
    swap_server: VirtualServer, swapper: WorkerProcess, tmp_path: Path
) -> None:
    """The parent is a symlink to a bigger image outside while qemu-img create runs:
    the child is made over the checked parent all the same, its backing name is the
    plain relative name, and qemu-img never opened the parent by name."""
    root = swapper.storage_root
    (root / "diff").mkdir(exist_ok=True)
    parent = root / "diff" / "parent.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(parent), "1M"], check=True)
    bigger = tmp_path / "bigger.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(bigger), "3M"], check=True)
    before = sha256(bigger)
    runs = len(tool_log(swapper, "qemu-img"))
    plan_swap(swapper, "qemu-img", {parent: bigger})
    ok(swap_server.create_differencing_virtual_hard_disk("diff/child.qcow2", "diff/parent.qcow2"))
    log = tool_log(swapper, "qemu-img")[runs:]
    assert f"swapped {parent}" in log, log
    header = json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", "-U", "-f", "qcow2", str(root / "diff/child.qcow2")],
        check=True, capture_output=True, text=True).stdout)
    assert header["virtual-size"] == MiB
    assert (header["backing-filename"], header["backing-filename-format"]) == (
        "parent.qcow2", "qcow2")
    assert " -u " in next(line for line in log if line.startswith("create"))
    child = swap_server.get_hard_disk("diff/child.qcow2")
    assert child.parent is not None and child.parent.file == "diff/parent.qcow2"
    assert sha256(bigger) == before


def test_a_planted_data_file_is_refused_before_qemu_opens_the_image(
    swap_server: VirtualServer, swapper: WorkerProcess, fifo: Path
) -> None:
    """A qcow2 whose external data file is a FIFO outside the root: refused from its
    header, before any qemu-img runs on it, and nothing blocks on the FIFO."""
    root = swapper.storage_root
    planted = root / "dataplant.qcow2"
    placeholder = root / "placeholder.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"data_file={placeholder},data_file_raw=on", str(planted), "1M"], check=True)
    subprocess.run(["qemu-img", "amend", "-q", "-f", "qcow2", "-o", f"data_file={fifo}",
                    str(planted)], check=True)
    placeholder.unlink()
    runs = len(tool_log(swapper, "qemu-img"))
    with pytest.raises(errors.VMTaskError) as caught:
        swap_server.get_hard_disk("dataplant.qcow2")
    assert caught.value.hresult == hresults.ACCESS_DENIED, caught.value
    assert tool_log(swapper, "qemu-img")[runs:] == []  # refused from the header alone
    denied(handle(swap_server, "dataplant.qcow2", "swap").convert("dp.raw",
                                                                  VMHardDiskType.Dynamic))
    vm = swap_server.create_virtual_machine("dataplant", memory_mb=32,
                                            disks=["dataplant.qcow2"], network=None)
    denied(vm.startup())
    vm.delete().wait_for_completion(30_000)
    assert tool_log(swapper, "qemu-img")[runs:] == []
    assert not (root / "dp.raw").exists()


def test_allowed_data_files_are_handed_to_qemu_by_the_worker(
    swap_server: VirtualServer, swapper: WorkerProcess
) -> None:
    """The data files that pass the check reach qemu-img through the pinned spec: an
    allow-listed device (a read-write host drive) and a data file in the root,
    named relative to the image (qemu itself would look it up from its cwd)."""
    root = swapper.storage_root
    device = root.parent / "swap-control" / "devices" / "sdy"
    device.write_bytes(b"\x5a" * MiB)
    ok(swap_server.create_host_drive_virtual_hard_disk("rw.qcow2", str(device), read_only=False))
    disk = swap_server.get_hard_disk("rw.qcow2")
    assert (disk.type, disk.host_drive) == (VMHardDiskType.HostDrive, str(device))
    ok(disk.convert("rw-copy.raw", VMHardDiskType.FixedSize))
    assert (root / "rw-copy.raw").read_bytes() == b"\x5a" * MiB
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    "data_file=data-in-root.raw,data_file_raw=on", str(root / "inroot.qcow2"),
                    "1M"], check=True, cwd=root)
    (root / "data-in-root.raw").write_bytes(b"\x33" * MiB)  # create made it empty
    ok(swap_server.get_hard_disk("inroot.qcow2").convert("inroot-copy.raw",
                                                         VMHardDiskType.FixedSize))
    assert (root / "inroot-copy.raw").read_bytes() == b"\x33" * MiB


def test_compact_writes_the_parent_name_without_opening_it(
    swap_server: VirtualServer, swapper: WorkerProcess, fifo: Path
) -> None:
    """While qemu-img compacts a differencing disk, its parent's name leads to a FIFO
    outside the root: the copy is made over the checked parent all the same (opening
    the name would block), and it records the parent's plain relative name."""
    root = swapper.storage_root
    (root / "cmp").mkdir(exist_ok=True)
    parent, child = root / "cmp" / "parent.raw", root / "cmp" / "child.qcow2"
    parent.write_bytes(b"\x11" * MiB)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "parent.raw", "-F", "raw",
                    str(child)], check=True)
    # Own data, then allocated zeros that compacting turns into zero clusters.
    qemu_io(child, "qcow2", "write -P 0x22 0 64k", "write -P 0 64k 448k")
    allocated = os.stat(child).st_blocks
    runs = len(tool_log(swapper, "qemu-img"))
    plan_swap(swapper, "qemu-img", {parent: fifo})
    ok(swap_server.get_hard_disk("cmp/child.qcow2").compact())
    assert f"swapped {parent}" in tool_log(swapper, "qemu-img")[runs:]
    assert os.stat(child).st_blocks < allocated  # the compacted copy replaced it
    header = json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", "-U", "-f", "qcow2", str(child)],
        check=True, capture_output=True, text=True).stdout)
    assert (header["backing-filename"], header["backing-filename-format"]) == (
        "parent.raw", "raw")
    qemu_io(child, "qcow2", "read -P 0x22 0 64k", "read -P 0 64k 448k", "read -P 0x11 512k 512k")
