"""The QEMU/QMP VM engine against real QEMU under TCG.

The guests have no OS: SeaBIOS finds nothing to boot and idles, which is all the
run-state, save and restore tests need.  Every wait is a condition with a deadline.
Each test gets its own short storage root (unix socket paths are limited to 107
bytes) and, at teardown, every QEMU whose command line mentions that root is killed,
then the test fails if one had to be.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from api.enums import VMVMState
from api.protocol import hresults
from workers.engines import qemu_vm
from workers.engines.context import NullContext
from workers.engines.qemu_vm import VMConfig, VMPaths, accel, lifecycle, statefile
from workers.failures import (
    Cancelled,
    DiskError,
    IllegalValue,
    IncompatibleSavedState,
    OperationFailed,
    OutOfMemory,
)

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None,
    reason="needs qemu-system-x86_64 and qemu-img",
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 20.0


def wait_for(predicate: Callable[[], bool], timeout: float = DEADLINE) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def qemus_under(root: Path) -> list[int]:
    """Pids of live QEMU processes whose command line refers to ``root``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        if stat[stat.rfind(")") + 2] == "Z":
            continue
        if os.path.basename(argv[0]).startswith(b"qemu-system") and any(
            os.fsencode(root) in arg for arg in argv
        ):
            found.append(int(entry.name))
    return found


@dataclass
class Env:
    root: Path
    disk: str
    started: list[VMPaths] = field(default_factory=list)

    def paths(self, name: str = "vm") -> VMPaths:
        paths = VMPaths.for_vm(self.root, name)
        self.started.append(paths)
        return paths

    def config(self, name: str = "vm", memory_mb: int = 64, **kwargs: object) -> VMConfig:
        kwargs.setdefault("disks", [self.disk])
        return VMConfig(name=name, memory_mb=memory_mb, accel="tcg", **kwargs)  # type: ignore[arg-type]

    def no_qemu_left(self) -> bool:
        return not qemus_under(self.root)


def make_disk(path: Path, fmt: str, size: str = "16M") -> str:
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), size], check=True)
    return str(path)


@pytest.fixture
def env() -> Iterator[Env]:
    root = Path(tempfile.mkdtemp(prefix="vmt-", dir="/tmp"))
    environment = Env(root, make_disk(root / "disk.qcow2", "qcow2"))
    try:
        yield environment
    finally:
        leftovers = qemus_under(root)
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        assert wait_for(environment.no_qemu_left, 10.0)
        sockets = list(root.rglob("*.sock"))
        shutil.rmtree(root, ignore_errors=True)
        assert not leftovers, f"QEMU processes left running: {leftovers}"
        assert not sockets, f"sockets left behind: {sockets}"


def is_monotonic(values: list[float]) -> bool:
    return all(a <= b for a, b in itertools.pairwise(values))


class CancelMidway(NullContext):
    """Requests cancellation once progress shows the save is under way."""

    def cancel_requested(self) -> bool:
        return any(5.0 < value < 95.0 for value in self.progress)


# --------------------------------------------------------------------------- config


def test_config_json_round_trip() -> None:
    config = VMConfig(
        name="web 1",
        memory_mb=128,
        disks=["/srv/a.qcow2", "/srv/b.img", "/srv/c.vhd"],
        kernel="/boot/vmlinuz",
        append="console=ttyS0",
        extra_args=["-device", "virtio-serial"],
    )
    assert isinstance(config.disks, tuple)
    assert VMConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json())["disks"] == ["/srv/a.qcow2", "/srv/b.img", "/srv/c.vhd"]
    assert [qemu_vm.disk_format(d) for d in config.disks] == ["qcow2", "raw", "vpc"]
    assert qemu_vm.disk_format("/x/y.VHDX") == "vhdx"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "../evil"},
        {"name": ""},
        {"memory_mb": 0},
        {"memory_mb": True},
        {"disks": ["relative.qcow2"]},
        {"disks": ["/a/disk.vmdk"]},
        {"disks": ["/a/x.qcow2", "/a/x.qcow2"]},
        {"accel": "hvf"},
        {"initrd": "/boot/initrd"},
        {"machine": "pc,accel=kvm"},
    ],
)
def test_config_rejects_illegal_values(kwargs: dict[str, object]) -> None:
    values: dict[str, object] = {"name": "vm", "memory_mb": 64, **kwargs}
    with pytest.raises(IllegalValue):
        VMConfig(**values)  # type: ignore[arg-type]


def test_config_from_json_rejects_garbage() -> None:
    for text in ("not json", "[1]", '{"name": "vm"}', '{"name": "vm", "memory_mb": 1, "x": 1}'):
        with pytest.raises(IllegalValue):
            VMConfig.from_json(text)


def test_fingerprint_tracks_memory_and_disks_not_name() -> None:
    base = VMConfig(name="a", memory_mb=64, disks=["/d/a.qcow2"])
    fingerprint = qemu_vm.config_fingerprint(base)
    assert qemu_vm.config_fingerprint(VMConfig(name="b", memory_mb=64, disks=["/d/a.qcow2"])) == (
        fingerprint
    )
    assert qemu_vm.config_fingerprint(VMConfig(name="a", memory_mb=128, disks=["/d/a.qcow2"])) != (
        fingerprint
    )
    assert qemu_vm.config_fingerprint(VMConfig(name="a", memory_mb=64)) != fingerprint


# --------------------------------------------------------------------------- accel


def test_choose_accel_auto_picks_tcg_on_this_host() -> None:
    assert qemu_vm.choose_accel("tcg") == "tcg"
    began = time.monotonic()
    probe = qemu_vm.probe_accel(refresh=True)
    elapsed = time.monotonic() - began
    assert elapsed < 2.5, f"the probe took {elapsed:.2f} s"
    if probe.verdict == "kvm":
        pytest.skip(f"KVM really runs at speed here: {probe}")
    assert probe.tcg_seconds is not None, probe
    began = time.monotonic()
    assert qemu_vm.choose_accel("auto") == "tcg"
    assert time.monotonic() - began < 0.05, "the verdict is cached per process"


def test_probe_rom_runs_to_completion_under_tcg(tmp_path: Path) -> None:
    rom = tmp_path / "probe.rom"
    rom.write_bytes(accel._probe_rom(outer=2, inner=10))
    assert accel._time_probe(rom, "tcg", 10.0) is not None


# --------------------------------------------------------------------------- run states


def reset_witness_args(directory: Path) -> tuple[list[str], Path]:
    """Firmware that writes "R" to port 0x402 at every reset, then halts for good.

    SeaBIOS is a poor reset witness: a reset during its POST can leave it hung and
    silent.  This 64 KiB image has no state at all, so N resets print N+1 letters.
    """
    code = bytes(
        [
            0xBA, 0x02, 0x04,  # mov dx, 0x402
            0xB0, 0x52,  # mov al, "R"
            0xEE,  # out dx, al
            0xFA,  # cli
            0xF4,  # hlt
            0xEB, 0xFD,  # jmp hlt
        ]
    )  # fmt: skip
    image = bytearray(0x10000)
    image[: len(code)] = code
    image[0xFFF0:0xFFF5] = b"\xea\x00\x00\x00\xf0"  # reset vector: jmp F000:0000
    rom = directory / "witness.rom"
    rom.write_bytes(bytes(image))
    log = directory / "debugcon.log"
    args = ["-bios", str(rom), "-chardev", f"file,id=dbg,path={log}"]
    return [*args, "-device", "isa-debugcon,iobase=0x402,chardev=dbg"], log


def test_start_pause_resume_reset(env: Env) -> None:
    extra_args, log = reset_witness_args(env.root)
    config = env.config(extra_args=extra_args)
    paths = env.paths()
    context = NullContext()

    pid = qemu_vm.start(config, paths, context)

    assert qemu_vm.find_pid(paths) == pid and qemu_vm.is_alive(paths)
    assert qemu_vm.query_status(paths) == "running"
    assert qemu_vm.vm_state(paths) == VMVMState.Running
    assert is_monotonic(context.progress) and context.progress[-1] == 100
    # A daemon in its own session, not a child of this process.
    assert os.getsid(pid) != os.getsid(0)
    assert Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[1] != str(os.getpid())

    def resets_seen() -> int:
        return log.read_text().count("R") - 1 if log.exists() else -1

    assert wait_for(lambda: resets_seen() == 0)
    qemu_vm.pause(paths)
    assert qemu_vm.query_status(paths) == "paused"
    qemu_vm.resume(paths)
    assert qemu_vm.query_status(paths) == "running"
    qemu_vm.reset(paths)
    assert wait_for(lambda: resets_seen() == 1)
    assert qemu_vm.query_status(paths) == "running"
    qemu_vm.pause(paths)
    qemu_vm.reset(paths)  # a paused VM is reset but only runs again on resume
    qemu_vm.resume(paths)
    assert wait_for(lambda: resets_seen() == 2)
    qemu_vm.powerdown(paths)  # no OS to act on it: the VM keeps running
    assert qemu_vm.query_status(paths) == "running"

    qemu_vm.turn_off(paths)
    assert not qemu_vm.is_alive(paths)
    assert qemu_vm.wait_for_exit(paths, 0)
    assert not paths.qmp_socket.exists() and not paths.pidfile.exists()
    assert paths.serial_log.exists()
    assert qemu_vm.vm_state(paths) == VMVMState.TurnedOff


def test_start_twice_is_refused_and_missing_disk_is_a_disk_error(env: Env) -> None:
    paths = env.paths()
    config = env.config()
    qemu_vm.start(config, paths, NullContext())
    with pytest.raises(OperationFailed, match="already running"):
        qemu_vm.start(config, paths, NullContext())
    qemu_vm.turn_off(paths)

    missing = env.config(name="other", disks=[str(env.root / "nope.qcow2")])
    with pytest.raises(DiskError) as excinfo:
        qemu_vm.start(missing, env.paths("other"), NullContext())
    assert excinfo.value.hresult == hresults.FILE_NOT_FOUND
    assert env.no_qemu_left()


def test_cancelled_start_launches_nothing(env: Env) -> None:
    context = NullContext()
    context.cancelled = True
    with pytest.raises(Cancelled):
        qemu_vm.start(env.config(), env.paths(), context)
    assert env.no_qemu_left()


def test_is_alive_checks_the_process_identity(env: Env) -> None:
    paths = env.paths()
    paths.directory.mkdir(parents=True)
    # A stale pidfile naming some other live process (this test) is not the VM.
    paths.pidfile.write_text(f"{os.getpid()}\n")
    assert not qemu_vm.is_alive(paths)
    assert qemu_vm.wait_for_exit(paths, 0)
    qemu_vm.cleanup(paths)
    assert not paths.pidfile.exists()
    qemu_vm.turn_off(paths)  # nothing to turn off: a no-op


def test_vm_outlives_the_process_that_started_it(env: Env) -> None:
    config = env.config()
    paths = env.paths()
    script = (
        "import sys\n"
        "from workers.engines import qemu_vm\n"
        "from workers.engines.context import NullContext\n"
        "config = qemu_vm.VMConfig.from_json(sys.argv[1])\n"
        "paths = qemu_vm.VMPaths(sys.argv[2])\n"
        "print(qemu_vm.start(config, paths, NullContext()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, config.to_json(), str(paths.directory)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    pid = int(done.stdout.strip())

    assert qemu_vm.find_pid(paths) == pid
    assert qemu_vm.query_status(paths) == "running"
    qemu_vm.pause(paths)
    assert qemu_vm.query_status(paths) == "paused"
    qemu_vm.turn_off(paths)
    assert not qemu_vm.is_alive(paths)


# --------------------------------------------------------------------------- save / restore


def test_save_then_restore(env: Env) -> None:
    config = env.config(memory_mb=256)
    paths = env.paths()
    qemu_vm.start(config, paths, NullContext())
    saving = NullContext()

    qemu_vm.save(config, paths, saving)

    assert is_monotonic(saving.progress)
    assert saving.progress[0] == 0 and saving.progress[-1] == 100
    assert any(0 < value < 100 for value in saving.progress)
    assert not qemu_vm.is_alive(paths) and env.no_qemu_left()
    assert paths.state_file.stat().st_size > 0
    info = qemu_vm.read_saved_state_info(paths.state_file)
    assert info["fingerprint"] == qemu_vm.config_fingerprint(config)
    assert info["run_state"] == "running"
    assert info["machine"].startswith("pc-i440fx-")
    assert not paths.state_tmp.exists() and not paths.qmp_socket.exists()
    assert qemu_vm.vm_state(paths) == VMVMState.Saved

    restoring = NullContext()
    qemu_vm.start(config, paths, restoring, incoming_state=paths.state_file)

    assert qemu_vm.query_status(paths) == "running"
    assert is_monotonic(restoring.progress) and restoring.progress[-1] == 100
    # The state is consumed: the guest has moved on from it.
    assert not paths.state_file.exists() and not paths.fingerprint_file.exists()
    qemu_vm.turn_off(paths)


def test_save_paused_vm_restores_paused(env: Env) -> None:
    config = env.config()
    paths = env.paths()
    qemu_vm.start(config, paths, NullContext())
    qemu_vm.pause(paths)
    qemu_vm.save(config, paths, NullContext())
    assert qemu_vm.read_saved_state_info(paths.state_file)["run_state"] == "paused"

    qemu_vm.start(config, paths, NullContext(), incoming_state=paths.state_file)
    assert qemu_vm.query_status(paths) == "paused"
    qemu_vm.turn_off(paths)


def test_cancel_save_midway_keeps_the_vm_running(env: Env) -> None:
    config = env.config(memory_mb=256)
    paths = env.paths()
    pid = qemu_vm.start(config, paths, NullContext())
    context = CancelMidway()

    # ~100 kB/s makes the ~1 MB stream of an idle 256 MB guest last about ten
    # seconds, so the cancel lands mid-way whatever the host's speed.
    with pytest.raises(Cancelled):
        qemu_vm.save(config, paths, context, max_bandwidth=100_000)

    assert qemu_vm.find_pid(paths) == pid
    assert qemu_vm.query_status(paths) == "running"
    assert not paths.state_file.exists() and not paths.state_tmp.exists()
    assert not paths.fingerprint_file.exists()
    assert max(context.progress) < 95
    # And the VM can still be saved after the cancelled attempt.
    qemu_vm.save(config, paths, NullContext())
    assert paths.state_file.exists() and not qemu_vm.is_alive(paths)


def saved_vm(env: Env, memory_mb: int = 64) -> tuple[VMConfig, VMPaths]:
    config = env.config(memory_mb=memory_mb)
    paths = env.paths()
    qemu_vm.start(config, paths, NullContext())
    qemu_vm.save(config, paths, NullContext())
    return config, paths


def test_restore_without_a_state_file_is_incompatible(env: Env) -> None:
    config = env.config()
    paths = env.paths()
    with pytest.raises(IncompatibleSavedState, match="no saved state"):
        qemu_vm.start(config, paths, NullContext(), incoming_state=paths.state_file)
    assert env.no_qemu_left()


def test_restore_with_changed_memory_is_incompatible(env: Env) -> None:
    config, paths = saved_vm(env)
    bigger = env.config(memory_mb=config.memory_mb * 2)
    with pytest.raises(IncompatibleSavedState, match="memory_mb"):
        qemu_vm.start(bigger, paths, NullContext(), incoming_state=paths.state_file)
    other_disks = env.config(disks=[make_disk(env.root / "other.qcow2", "qcow2")])
    with pytest.raises(IncompatibleSavedState, match="disks"):
        qemu_vm.start(other_disks, paths, NullContext(), incoming_state=paths.state_file)
    assert env.no_qemu_left()
    assert paths.state_file.exists(), "a refused restore keeps the saved state"


def test_restore_from_a_corrupt_state_file_is_incompatible(env: Env) -> None:
    config, paths = saved_vm(env)
    with open(paths.state_file, "r+b") as stream:
        stream.seek(100)
        stream.write(b"\xff" * 64)
    with pytest.raises(IncompatibleSavedState, match="corrupt"):
        qemu_vm.start(config, paths, NullContext(), incoming_state=paths.state_file)
    assert env.no_qemu_left()

    paths.fingerprint_file.unlink()
    with pytest.raises(IncompatibleSavedState, match="fingerprint"):
        qemu_vm.start(config, paths, NullContext(), incoming_state=paths.state_file)
    assert env.no_qemu_left()


def test_qemu_load_failure_is_incompatible_and_leaves_no_process(env: Env) -> None:
    config, paths = saved_vm(env)
    # Damage the stream and make the fingerprint file agree, so the checks pass and
    # QEMU itself has to reject it.
    data = bytearray(paths.state_file.read_bytes())
    data[32:] = b"\x5a" * (len(data) - 32)
    paths.state_file.write_bytes(bytes(data))
    info = json.loads(paths.fingerprint_file.read_text())
    size, digest = statefile._sha256(paths.state_file)
    info.update(state_size=size, state_sha256=digest)
    paths.fingerprint_file.write_text(json.dumps(info))

    with pytest.raises(IncompatibleSavedState, match="could not load"):
        qemu_vm.start(config, paths, NullContext(), incoming_state=paths.state_file)
    assert env.no_qemu_left()
    assert not paths.qmp_socket.exists() and not paths.pidfile.exists()
    assert paths.state_file.exists()


def test_save_with_a_vhd_disk_is_refused(env: Env) -> None:
    vhd = make_disk(env.root / "disk.vhd", "vpc")
    config = env.config(disks=[vhd])
    paths = env.paths()
    qemu_vm.start(config, paths, NullContext())
    with pytest.raises(IllegalValue, match="VHD"):
        qemu_vm.save(config, paths, NullContext())
    assert qemu_vm.query_status(paths) == "running"
    assert not paths.state_file.exists() and not paths.state_tmp.exists()
    qemu_vm.turn_off(paths)


# --------------------------------------------------------------------------- memory


def host_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no MemTotal")


def test_more_memory_than_the_host_has_is_out_of_memory(env: Env) -> None:
    config = env.config(memory_mb=2 * host_memory_mb())
    with pytest.raises(OutOfMemory, match="available"):
        qemu_vm.start(config, env.paths(), NullContext())
    assert env.no_qemu_left()


def test_qemu_failing_to_allocate_guest_ram_is_out_of_memory(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Skip the engine's own check so that QEMU's mmap of guest RAM is what fails:
    # under heuristic overcommit a single mapping beyond RAM + swap is refused.
    if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1":
        pytest.skip("overcommit_memory=1: the kernel lets any mapping through")
    monkeypatch.setattr(lifecycle, "_available_memory_bytes", lambda: None)
    config = env.config(memory_mb=3 * host_memory_mb())
    paths = env.paths()
    with pytest.raises(OutOfMemory, match="cannot set up guest memory"):
        qemu_vm.start(config, paths, NullContext())
    assert env.no_qemu_left()
    assert not paths.qmp_socket.exists() and not paths.pidfile.exists()
