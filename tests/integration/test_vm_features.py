"""What makes a VM usable: CPUs, user-mode networking with a port forward, the
display (screenshots, VNC), the serial console, guest information, editing, and
the disk inventory (list, delete, resize).  Real QEMU under TCG, the tiny guest.

One guest is booted and every assertion that needs a running guest is made on it.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from api import VirtualServer, VMTaskResult, VMVMState, errors
from api.protocol import tasks
from tests.helpers import assert_succeeded as ok
from tests.helpers import kill_leftover_qemu, qemu_io
from workers.devtools.sandbox import RedisServer, WorkerProcess, wait_until
from workers.devtools.tinyguest import build_tiny_guest
from workers.engines.qemu_vm.devices import BRIDGE_HELPER

S = VMVMState
BOOT_S = 120.0


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    # Short paths: QEMU's unix sockets live under the storage root (108-byte limit).
    base = Path(tmp_path_factory.mktemp("vf"))
    redis = RedisServer(base / "redis").start()
    worker = WorkerProcess(redis.url, "vfhost", base / "root", base, concurrency=2,
                           env={"VMTASK_HEARTBEAT_SECONDS": "1"}).start()
    guest = build_tiny_guest()
    (base / "root" / "guest").mkdir(parents=True, exist_ok=True)
    (base / "root" / "guest" / "vmlinuz").write_bytes(guest.kernel.read_bytes())
    (base / "root" / "guest" / "initrd.gz").write_bytes(guest.initrd.read_bytes())
    yield redis.url, base / "root"
    worker.stop()
    kill_leftover_qemu(base / "root")
    redis.stop()


@pytest.fixture
def server(host: tuple[str, Path]) -> Iterator[VirtualServer]:
    with VirtualServer(host[0], host="vfhost", poll_interval=0.5) as vs:
        yield vs


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG, after checking that every chunk's CRC holds and
    that its image data inflates."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, idat, size = 8, b"", (0, 0)
    while offset < len(data):
        (length,) = struct.unpack_from(">I", data, offset)
        kind = data[offset + 4: offset + 8]
        body = data[offset + 8: offset + 8 + length]
        (crc,) = struct.unpack_from(">I", data, offset + 8 + length)
        assert zlib.crc32(kind + body) == crc, kind
        if kind == b"IHDR":
            size = struct.unpack_from(">II", body)
        elif kind == b"IDAT":
            idat += body
        offset += 12 + length
    width, height = size
    assert len(zlib.decompress(idat)) >= width * height  # at least a byte per pixel
    return width, height


def last_task_id(server: VirtualServer) -> str | None:
    recent = server.tasks(limit=1)
    return recent[0].id if recent else None


@pytest.mark.slow
def test_a_guest_with_two_cpus_a_forward_a_console_and_an_agent(server: VirtualServer) -> None:
    port = free_port()
    vm = server.create_virtual_machine(
        "feat", memory_mb=128, kernel="guest/vmlinuz", initrd="guest/initrd.gz",
        append="console=ttyS0 panic=-1", guest_agent=True)
    assert (vm.cpus, vm.network, vm.port_forwards) == (1, "user", {})
    with pytest.raises(errors.InvalidStateError):
        vm.screenshot()
    assert vm.guest_os.os_name is None and not vm.guest_os.is_heartbeating

    # configure while TurnedOff: the next boot gets it
    vm.configure(cpus=2, port_forwards={port: 80})
    details = vm.details
    assert (details["cpus"], details["port_forwards"], details["pid"]) == (2, {port: 80}, None)
    assert details["vnc"] is None and details["uptime_s"] is None
    with pytest.raises(errors.InvalidArgumentError):
        vm.configure(network="none")  # forwards need the user network
    with pytest.raises(errors.InvalidArgumentError):
        vm.configure(cpus=0)

    ok(vm.startup())
    try:
        details = vm.details
        assert details["state"] is S.Running and details["pid"] > 0
        assert details["uptime_s"] >= 0
        host_address, _, vnc_port = details["vnc"].rpartition(":")
        assert host_address == "127.0.0.1" and 5900 <= int(vnc_port) <= 6899

        # configure while Running: refused, nothing queued
        before = last_task_id(server)
        with pytest.raises(errors.InvalidStateError):
            vm.configure(memory_mb=256)
        assert last_task_id(server) == before and vm.details["memory_mb"] == 128

        # the guest saw two CPUs, and the kernel's boot lines are in the console log
        wait_until(lambda: "vmtask-guest: cpus" in vm.console_log(), BOOT_S, "the guest's CPU line",
                   interval=0.5)
        log = vm.console_log()
        assert "Linux version" in log and "vmtask-guest: cpus 2" in log
        # The guest may still be writing: the tail is the end of a log read right after.
        wait_until(lambda: vm.console_log(tail_bytes=10) == vm.console_log()[-10:], 30,
                   "the tail to match the log's end", interval=0.2)

        # DHCP on user-mode networking, as the agent reports it
        assert wait_until(lambda: any("10.0.2.15/24" in i["addresses"]
                                      for i in vm.guest_os.network_interfaces), BOOT_S,
                          "a DHCP address", interval=0.5)
        eth = next(i for i in vm.guest_os.network_interfaces if i["name"] != "lo")
        assert eth["mac"] == details["mac"]
        assert vm.guest_os.is_heartbeating
        assert vm.guest_os.os_name == "vmtask tiny guest (busybox)"

        # the forwarded host port reaches the guest's listener
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as reply:
            assert reply.read().decode().strip() == "vmtask-guest http"

        # the VNC console asks for the password of this start
        access = vm.console_access()
        assert access is not None and access["address"] == details["vnc"]
        assert len(access["password"]) == 8
        with socket.create_connection(("127.0.0.1", int(vnc_port)), timeout=10) as vnc:
            assert vnc.recv(12) == b"RFB 003.008\n"
            vnc.sendall(b"RFB 003.008\n")
            count = vnc.recv(1)[0]
            assert list(vnc.recv(count)) == [2]  # VNC authentication only
        # ... and this password logs in, another does not.
        assert vnc_login(int(vnc_port), access["password"]) == 0
        assert vnc_login(int(vnc_port), "wrong-pw") != 0

        # screenshots running and paused
        assert png_size(vm.screenshot()) == (720, 400)
        ok(vm.pause())
        assert png_size(vm.screenshot()) == (720, 400)
        ok(vm.resume())

        # a Saved VM keeps its configuration: its saved state would not fit another
        ok(vm.save())
        with pytest.raises(errors.InvalidStateError):
            vm.configure(cpus=1)
        ok(vm.startup())  # restores with the configuration it was saved with
        assert vm.details["cpus"] == 2
    finally:
        ok(vm.turn_off())
    details = vm.details
    assert (details["pid"], details["vnc"], details["uptime_s"]) == (None, None, None)
    assert vm.console_access() is None
    with pytest.raises(errors.InvalidStateError):
        vm.screenshot()
    assert "Linux version" in vm.console_log()  # the log outlives the process
    ok(vm.delete())


def test_network_arguments_are_checked_before_anything_is_written(
        server: VirtualServer) -> None:
    for bad in ({"network": "wifi"}, {"network": "bridge:"},
                {"network": "bridge:name-far-too-long"}, {"network": "bridge:a/b"},
                {"port_forwards": {8080: 80}, "network": None},
                {"port_forwards": {0: 80}}, {"port_forwards": {8080: 70000}},
                {"port_forwards": [8080]}, {"cpus": 0}, {"cpus": True}, {"cpus": 256}):
        with pytest.raises(errors.InvalidArgumentError):
            server.create_virtual_machine("badnet", **bad)  # type: ignore[arg-type]
        assert server.find_virtual_machine("badnet") is None
    vm = server.create_virtual_machine("nonic", network=None, cpus=3)
    assert vm.details["network"] is None and vm.details["cpus"] == 3
    bridged = server.create_virtual_machine("bridged", network="bridge:br0")
    assert bridged.details["network"] == "bridge:br0"
    ok(vm.delete())
    ok(bridged.delete())


def test_a_vm_without_a_nic_boots(server: VirtualServer) -> None:
    vm = server.create_virtual_machine(
        "nonicboot", memory_mb=128, kernel="guest/vmlinuz", initrd="guest/initrd.gz",
        append="console=ttyS0 quiet panic=-1", network=None)
    ok(vm.startup())
    try:
        assert wait_until(lambda: "VMTASK-GUEST-READY" in vm.console_log(), BOOT_S,
                          "the boot marker", interval=0.5)
    finally:
        ok(vm.turn_off())
    ok(vm.delete())


def test_disk_inventory_delete_and_resize(server: VirtualServer, host: tuple[str, Path]) -> None:
    root = host[1]
    ok(server.create_dynamic_virtual_hard_disk("inv/base.qcow2", 16))
    ok(server.create_differencing_virtual_hard_disk("inv/child.qcow2", "inv/base.qcow2"))
    ok(server.create_fixed_virtual_hard_disk("inv/attached.img", 4))
    vm = server.create_virtual_machine("invvm", memory_mb=32, disks=["inv/attached.img"],
                                       undoable=True, network=None)
    ok(vm.startup())  # makes its undo overlay under vms/invvm/
    ok(vm.turn_off())
    assert list((root / "vms" / "invvm" / "undo").glob("*.qcow2"))

    listed = {d.file: d for d in server.hard_disks()}
    assert {"inv/base.qcow2", "inv/child.qcow2", "inv/attached.img"} <= set(listed)
    assert not [f for f in listed if f.startswith("vms/")]
    child = listed["inv/child.qcow2"]
    assert child.parent is not None and child.parent.file == "inv/base.qcow2"

    with pytest.raises(errors.InvalidStateError, match="attached to VM invvm"):
        listed["inv/attached.img"].delete()
    with pytest.raises(errors.InvalidStateError, match=r"parent of inv/child\.qcow2"):
        listed["inv/base.qcow2"].delete()
    # The worker's own check, for a producer that skipped the producer's: still refused.
    task = server.submit(tasks.DISK_DELETE, description="forced", kwargs={"path": "inv/base.qcow2"},
                         host="vfhost")
    assert task.wait_for_completion(60_000) and task.error == 0x8007139F
    assert (root / "inv" / "base.qcow2").exists()

    ok(child.delete())
    ok(listed["inv/base.qcow2"].delete())
    assert not (root / "inv" / "base.qcow2").exists()
    assert {"inv/base.qcow2", "inv/child.qcow2"}.isdisjoint(d.file for d in server.hard_disks())
    ok(vm.delete())
    ok(listed["inv/attached.img"].delete())

    # resize: grows the guest-visible size, keeps the data
    ok(server.create_dynamic_virtual_hard_disk("inv/grow.qcow2", 8))
    image = root / "inv" / "grow.qcow2"
    qemu_io(image, "qcow2", "write -P 0xa5 0 1M", "write -P 0x5a 7M 1M")
    hd = server.get_hard_disk("inv/grow.qcow2")
    with pytest.raises(errors.InvalidArgumentError, match="only grows"):
        hd.resize(4)
    with pytest.raises(errors.InvalidArgumentError):
        hd.resize(8)
    ok(hd.resize(24))
    assert server.get_hard_disk("inv/grow.qcow2").size_in_guest == 24 << 20
    qemu_io(image, "qcow2", "read -P 0xa5 0 1M", "read -P 0x5a 7M 1M", "read -P 0 8M 16M")
    ok(server.create_dynamic_virtual_hard_disk("inv/old.vhdx", 8))
    task = server.get_hard_disk("inv/old.vhdx").resize(16)
    assert task.wait_for_completion(60_000)
    assert task.result is VMTaskResult.IllegalValueError and "convert" in task.error_description


def vnc_login(port: int, password: str) -> int:
    """RFB 3.8 VNC authentication: the SecurityResult, 0 when the password is right.

    The response is the challenge encrypted with DES, keyed by the password with
    each byte's bits reversed (RFC 6143 7.2.2); openssl does the DES.
    """
    key = bytes(int(f"{b:08b}"[::-1], 2) for b in password.encode()[:8].ljust(8, b"\0"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as vnc:
        vnc.recv(12)
        vnc.sendall(b"RFB 003.008\n")
        vnc.recv(vnc.recv(1)[0])
        vnc.sendall(bytes([2]))
        challenge = vnc.recv(16)
        response = subprocess.run(
            ["openssl", "enc", "-des-ecb", "-nopad", "-K", key.hex(),
             "-provider", "legacy", "-provider", "default"],
            input=challenge, capture_output=True, check=True).stdout
        vnc.sendall(response)
        return int.from_bytes(vnc.recv(4), "big")


@pytest.fixture
def host_bridge() -> Iterator[str]:
    """A Linux bridge on this machine, allowed to qemu-bridge-helper; removed after."""
    if os.geteuid() != 0 or shutil.which("ip") is None or not Path(BRIDGE_HELPER).exists():
        pytest.skip("needs root, iproute2 and qemu-bridge-helper")
    name = f"vmtbr{os.getpid() % 10000}"
    conf = Path("/etc/qemu/bridge.conf")
    before = conf.read_text() if conf.exists() else None
    conf.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True)
    try:
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
        conf.write_text((before or "") + f"allow {name}\n")
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)
        if before is None:
            conf.unlink(missing_ok=True)
        else:
            conf.write_text(before)


@pytest.mark.slow
def test_a_guest_on_a_host_bridge(server: VirtualServer, host_bridge: str) -> None:
    vm = server.create_virtual_machine(
        "brvm", memory_mb=128, kernel="guest/vmlinuz", initrd="guest/initrd.gz",
        append="console=ttyS0 panic=-1", guest_agent=True, network=f"bridge:{host_bridge}")
    try:
        ok(vm.startup())
        mac = vm.details["mac"]
        # The guest has its NIC, with the MAC vmtask gave it ...
        wait_until(lambda: any(i["mac"] == mac for i in vm.guest_os.network_interfaces),
                   BOOT_S, "the guest's NIC", interval=0.5)
        # ... on a tap that the helper put on the host bridge, which the guest's
        # frames (its DHCP requests) reach.
        ports = subprocess.run(["ip", "-o", "link", "show", "master", host_bridge],
                               capture_output=True, text=True, check=True).stdout
        assert "tap" in ports, ports
        received = Path(f"/sys/class/net/{host_bridge}/statistics/rx_packets")
        wait_until(lambda: int(received.read_text()) > 0, 60, "the guest's frames on the bridge",
                   interval=0.5)
    finally:
        if vm.state is not S.TurnedOff:
            ok(vm.turn_off())
        ok(vm.delete())
