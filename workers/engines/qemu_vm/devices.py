"""The command-line pieces for a VM's CPUs, NIC, display and VNC server.

Kept apart from `lifecycle` so the argv of each device can be checked without a
QEMU (the bridge, in particular, needs a host bridge no test machine has).
"""

from __future__ import annotations

import os

from workers.engines.qemu_vm.config import (
    BRIDGE_HELPER,
    NETWORK_USER,
    VMConfig,
    bridge_name,
)

# QEMU picks the first free VNC display in this range (port 5900 + display): a
# free port per VM with no race between choosing and binding.
VNC_DISPLAYS = (0, 999)


def qemu_opt(value: str | os.PathLike[str]) -> str:
    # QemuOpts splits on commas; a literal comma is written twice.
    return os.fspath(value).replace(",", ",,")


def _host_address(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def cpu_argv(config: VMConfig) -> list[str]:
    return ["-smp", str(config.cpus)]


def network_argv(config: VMConfig) -> list[str]:
    """One virtio NIC on user-mode NAT or on a host bridge; nothing without a network."""
    if config.network is None:
        return []
    if config.network == NETWORK_USER:
        backend = "user,id=net0"
        for host_port, guest_port in config.port_forwards:
            backend += f",hostfwd=tcp:{config.forward_listen}:{host_port}-:{guest_port}"
    else:
        bridge = bridge_name(config.network)
        assert bridge is not None  # VMConfig validated it
        # QEMU runs the setuid helper, which checks /etc/qemu/bridge.conf's allow
        # list, creates the tap and adds it to the bridge: QEMU needs no privilege.
        backend = f"bridge,id=net0,br={bridge},helper={qemu_opt(BRIDGE_HELPER)}"
    device = "virtio-net-pci,netdev=net0"
    if config.mac is not None:
        device += f",mac={config.mac}"
    # No option ROM: VMs boot from disk or kernel, never PXE, and the ROM is one
    # more firmware file the host must have.
    device += ",romfile="
    return ["-netdev", backend, "-device", device]


def display_argv(config: VMConfig) -> list[str]:
    argv: list[str] = []
    if config.vga:
        argv += ["-device", "VGA"]
    if config.vnc_listen is not None:
        # password=on: nobody gets in until the worker sets this start's password.
        low, high = VNC_DISPLAYS
        argv += ["-vnc", f"{_host_address(config.vnc_listen)}:{low},to={high},password=on"]
    return argv
