"""The tiny guest and the guest-agent client, against real QEMU under TCG.

Every wait is a condition with a deadline: the serial log is polled for the
boot marker, QEMU's exit is awaited with a timeout.  Each test boots its own VM
(about 2 s under TCG) and kills it at teardown whatever happened.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from workers.devtools import tinyguest
from workers.devtools.tinyguest import (
    READY_MARKER,
    TinyGuest,
    build_tiny_guest,
    tiny_guest_boot_args,
)
from workers.engines.guest_agent import GuestAgentClient, qemu_guest_agent_args
from workers.failures import GuestAgentError, OperationTimedOut

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None or shutil.which("apt-get") is None,
    reason="needs qemu-system-x86_64 and apt",
)

BOOT_TIMEOUT = 60.0
EXIT_TIMEOUT = 30.0


@pytest.fixture(scope="session")
def tiny_guest() -> TinyGuest:
    return build_tiny_guest()


class Vm:
    """One QEMU process booting the tiny guest, with its serial log and sockets."""

    def __init__(self, guest: TinyGuest, directory: Path, agent: str, reboot: bool) -> None:
        self.directory = directory
        self.serial = directory / "serial.log"
        self.qmp_socket = directory / "qmp"
        self.agent_socket = directory / "qga"
        args = [
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-m",
            "128",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            f"file:{self.serial}",
            "-qmp",
            f"unix:{self.qmp_socket},server=on,wait=off",
            *tiny_guest_boot_args(guest),
        ]
        if agent == "port":
            args += qemu_guest_agent_args(self.agent_socket)
        elif agent == "no-port":
            # The host end exists but the guest has no port to open: nobody answers.
            args += [
                "-device",
                "virtio-serial-pci",
                "-chardev",
                f"socket,path={self.agent_socket},server=on,wait=off,id=qga0",
            ]
        if not reboot:
            args.append("-no-reboot")
        self.output = directory / "qemu.log"
        self.started = time.monotonic()
        with open(self.output, "wb") as output:
            self.process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
            )

    def markers(self) -> int:
        try:
            return self.serial.read_text(errors="replace").count(READY_MARKER)
        except FileNotFoundError:
            return 0

    def wait_for_marker(self, count: int = 1, timeout: float = BOOT_TIMEOUT) -> float:
        """Seconds from QEMU's start until the marker has appeared `count` times."""
        deadline = time.monotonic() + timeout
        while self.markers() < count:
            if self.process.poll() is not None:
                pytest.fail(f"QEMU exited with {self.process.returncode}: {self.diagnostics()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no boot marker #{count} within {timeout} s: {self.diagnostics()}")
            time.sleep(0.02)
        return time.monotonic() - self.started

    def wait_for_serial(self, text: str, timeout: float = EXIT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.serial.read_text(errors="replace"):
            if time.monotonic() > deadline:
                pytest.fail(f"no {text!r} on the console within {timeout} s: {self.diagnostics()}")
            time.sleep(0.05)

    def wait_exit(self, timeout: float = EXIT_TIMEOUT) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"QEMU still running after {timeout} s: {self.diagnostics()}")

    def qmp(self, command: str, timeout: float = 10.0) -> Any:
        async def run() -> Any:
            client = QMPClient("vmtask-test")
            await client.connect(str(self.qmp_socket))
            try:
                return await client.execute(command)
            finally:
                await client.disconnect()

        async def bounded() -> Any:
            return await asyncio.wait_for(run(), timeout)

        return asyncio.run(bounded())

    def diagnostics(self) -> str:
        serial = self.serial.read_text(errors="replace") if self.serial.exists() else ""
        output = self.output.read_text(errors="replace")
        return f"QEMU output: {output[-2000:]!r}, serial log: {serial[-2000:]!r}"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=EXIT_TIMEOUT)


@pytest.fixture
def launch(tiny_guest: TinyGuest) -> Iterator[Callable[..., Vm]]:
    vms: list[Vm] = []
    # A short private directory: unix socket paths are limited to 107 bytes.
    directory = Path(tempfile.mkdtemp(prefix="vmtask-tg-"))

    def start(agent: str = "port", reboot: bool = False, guest: TinyGuest | None = None) -> Vm:
        vm_dir = directory / str(len(vms))
        vm_dir.mkdir()
        vm = Vm(guest or tiny_guest, vm_dir, agent, reboot)
        vms.append(vm)
        return vm

    try:
        yield start
    finally:
        for vm in vms:
            vm.kill()
        shutil.rmtree(directory, ignore_errors=True)


# -- building ---------------------------------------------------------------------


def test_cached_build_is_returned_without_rebuilding(
    tiny_guest: TinyGuest, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert tiny_guest.kernel.is_file() and tiny_guest.initrd.is_file()
    assert "console=ttyS0" in tiny_guest.append
    before = (tiny_guest.kernel.stat().st_ino, tiny_guest.initrd.stat().st_mtime_ns)

    def no_rebuild(*args: object) -> None:
        raise AssertionError("the cached guest was rebuilt")

    monkeypatch.setattr(tinyguest, "_build", no_rebuild)
    started = time.monotonic()
    again = build_tiny_guest()
    assert time.monotonic() - started < 10
    assert again == tiny_guest
    assert (again.kernel.stat().st_ino, again.initrd.stat().st_mtime_ns) == before


def test_concurrent_builders_share_one_build(tmp_path: Path) -> None:
    program = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from workers.devtools.tinyguest import build_tiny_guest\n"
        "g = build_tiny_guest(Path(sys.argv[1]))\n"
        "print(json.dumps([str(g.kernel), str(g.initrd)]))\n"
    )
    repo = Path(__file__).resolve().parents[2]
    builders = [
        subprocess.Popen(
            [sys.executable, "-c", program, str(tmp_path)],
            cwd=repo,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = []
    try:
        for builder in builders:
            out, err = builder.communicate(timeout=300)
            assert builder.returncode == 0, err
            results.append(json.loads(out))
    finally:
        for builder in builders:
            if builder.poll() is None:
                builder.kill()
                builder.wait()
    assert results[0] == results[1]
    kernel, initrd = (Path(p) for p in results[0])
    assert kernel.parent.parent == tmp_path and initrd.parent == kernel.parent
    assert sorted(p.name for p in kernel.parent.iterdir()) == [
        "initrd.img",
        "manifest.json",
        "vmlinuz",
    ]
    # One finished build, no staging directory left behind.
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [kernel.parent.name]
    manifest = json.loads((kernel.parent / "manifest.json").read_text())
    modules = manifest["modules"]
    for module in ("virtio_pci", "virtio_console", "button", "evdev"):
        assert module in modules
    # Dependencies are loaded before the modules that need them.
    assert modules.index("virtio_ring") < modules.index("virtio") < modules.index("virtio_pci")
    assert modules.index("virtio") < modules.index("virtio_console")


# -- booting ----------------------------------------------------------------------


def test_boots_and_prints_the_marker(launch: Callable[..., Vm]) -> None:
    vm = launch()
    boot = vm.wait_for_marker()
    print(f"tiny guest booted in {boot:.2f} s")
    assert vm.process.poll() is None


def test_guest_ping_is_answered(launch: Callable[..., Vm]) -> None:
    vm = launch()
    vm.wait_for_marker()
    # Garbage, including an unterminated line, must not wedge the agent.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.connect(str(vm.agent_socket))
        raw.sendall(b'not json\n{"execute": \n\x00\x01junk {"execute":"guest-nope"}\n{"exe')
    with GuestAgentClient(vm.agent_socket) as agent:
        assert agent.ping(timeout=20) is True
        assert agent.ping(timeout=5) is True
        info = agent.info(timeout=5)
        names = {c["name"] for c in info["supported_commands"]}
        assert {"guest-ping", "guest-sync-delimited", "guest-shutdown", "guest-exec"} <= names
        # The real qemu-ga (its version is QEMU's), reading the guest's os-release.
        assert re.fullmatch(r"\d+\.\d+\.\d+", info["version"]), info["version"]
        osinfo = agent.execute("guest-get-osinfo", timeout=5)
        assert (osinfo["id"], osinfo["pretty-name"]) == (
            "vmtask-tinyguest", "vmtask tiny guest (busybox)")


def test_system_powerdown_after_the_marker_powers_the_guest_off(
    launch: Callable[..., Vm],
) -> None:
    vm = launch()
    vm.wait_for_marker()
    pressed = time.monotonic()
    vm.qmp("system_powerdown")
    assert vm.wait_exit() == 0
    print(f"powered off {1000 * (time.monotonic() - pressed):.0f} ms after system_powerdown")


def test_agent_powerdown_makes_qemu_exit(launch: Callable[..., Vm]) -> None:
    vm = launch()
    vm.wait_for_marker()
    with GuestAgentClient(vm.agent_socket) as agent:
        agent.shutdown("powerdown", timeout=20)
    assert vm.wait_exit() == 0


def test_agent_reboot_boots_the_guest_again(launch: Callable[..., Vm]) -> None:
    vm = launch(reboot=True)
    vm.wait_for_marker()
    with GuestAgentClient(vm.agent_socket) as agent:
        agent.shutdown("reboot", timeout=20)
        vm.wait_for_marker(count=2)
        assert vm.process.poll() is None
        # The same connection resynchronises with the agent of the new boot.
        assert agent.ping(timeout=20) is True


def test_agent_reboot_is_answered_by_the_old_boot_while_it_goes_down(
    launch: Callable[..., Vm],
) -> None:
    """What `guest_restart` must cope with: the request returns at once and the old
    boot's agent answers on, then a new boot (a new boot id) answers."""
    vm = launch(reboot=True)
    vm.wait_for_marker()
    with GuestAgentClient(vm.agent_socket) as agent:
        before = agent.boot_id(timeout=20)
        agent.shutdown("reboot", timeout=20)
        assert agent.boot_id(timeout=5) == before  # still the dying boot
        assert vm.markers() == 1
        vm.wait_for_marker(count=2)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            try:
                after = agent.boot_id(timeout=2)
                break
            except OperationTimedOut:
                assert time.monotonic() < deadline, vm.diagnostics()
        assert after != before


def test_a_refused_shutdown_raises_the_agents_error(launch: Callable[..., Vm]) -> None:
    vm = launch(guest=build_tiny_guest(shutdown_fails=True))
    vm.wait_for_marker()
    with GuestAgentClient(vm.agent_socket) as agent:
        for mode in ("reboot", "powerdown"):
            with pytest.raises(GuestAgentError, match="child process has failed to shutdown"):
                agent.shutdown(mode, timeout=20)  # type: ignore[arg-type]
        # The refusal leaves the connection in step.
        assert agent.ping(timeout=5) is True
    assert vm.process.poll() is None and vm.markers() == 1


def test_guest_exec_waits_for_the_program_and_returns_its_output(
    launch: Callable[..., Vm],
) -> None:
    vm = launch()
    vm.wait_for_marker()
    with GuestAgentClient(vm.agent_socket) as agent:
        done = agent.run(["/bin/sh", "-c", "echo out; echo err >&2; exit 3"], timeout=20)
        assert (done.exit_code, done.stdout, done.stderr) == (3, b"out\n", b"err\n")
        fed = agent.run(["/bin/cat"], stdin=b"\x00\xffdata", timeout=20)
        assert (fed.exit_code, fed.stdout) == (0, b"\x00\xffdata")
        with pytest.raises(GuestAgentError):
            agent.run(["/no/such/program"], timeout=20)


def test_agent_halt_stops_the_guest_but_not_qemu(launch: Callable[..., Vm]) -> None:
    vm = launch()
    vm.wait_for_marker()
    with GuestAgentClient(vm.agent_socket) as agent:
        agent.shutdown("halt", timeout=20)
        # A real guest goes down behind the request, its agent answering meanwhile;
        # the kernel says when it has halted.
        vm.wait_for_serial("System halted")
        with pytest.raises(OperationTimedOut):
            agent.ping(timeout=1)
    assert vm.process.poll() is None


def test_ping_times_out_without_an_agent_port(launch: Callable[..., Vm]) -> None:
    vm = launch(agent="no-port")
    vm.wait_for_marker()
    started = time.monotonic()
    with GuestAgentClient(vm.agent_socket) as agent, pytest.raises(OperationTimedOut):
        agent.ping(timeout=1.5)
    assert 1.5 <= time.monotonic() - started < 5


def test_ping_times_out_when_the_socket_does_not_exist(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(OperationTimedOut):
        GuestAgentClient(tmp_path / "missing.sock").ping(timeout=0.5)
    assert 0.5 <= time.monotonic() - started < 3
