"""The command line of a VM's CPUs, NIC, display and VNC, without a QEMU.

The bridge NIC cannot be booted here (no host bridge, no setuid helper
configured), so its argv is what is checked.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.engines.qemu_img.pinned import PinnedChain, PinnedImage
from workers.engines.qemu_vm import (
    OpenedFiles,
    VMConfig,
    VMPaths,
    build_argv,
    config_fingerprint,
    read_console,
    rotate_serial_log,
)
from workers.engines.qemu_vm.devices import network_argv
from workers.failures import IllegalValue


def config(**kwargs: object) -> VMConfig:
    return VMConfig(name="vm1", memory_mb=64, **kwargs)  # type: ignore[arg-type]


def test_bridge_network_uses_qemu_bridge_helper() -> None:
    argv = network_argv(config(network="bridge:br0", mac="52:54:00:aa:bb:cc"))
    assert argv == [
        "-netdev", "bridge,id=net0,br=br0,helper=/usr/lib/qemu/qemu-bridge-helper",
        "-device", "virtio-net-pci,netdev=net0,mac=52:54:00:aa:bb:cc,romfile=",
    ]


def test_user_network_forwards_listen_on_the_configured_address() -> None:
    argv = network_argv(config(network="user", port_forwards=[[8080, 80], [2222, 22]],
                               forward_listen="0.0.0.0"))
    assert argv[:2] == ["-netdev", "user,id=net0,hostfwd=tcp:0.0.0.0:8080-:80,"
                                   "hostfwd=tcp:0.0.0.0:2222-:22"]
    assert network_argv(config()) == []


def test_full_argv_has_cpus_vga_and_a_password_protected_vnc() -> None:
    argv = build_argv(config(cpus=4, vga=True, vnc_listen="::1"), VMPaths.for_vm("/r", "vm1"),
                      "tcg")
    assert argv[argv.index("-smp") + 1] == "4"
    assert argv[argv.index("-device") + 1] == "VGA"
    assert argv[argv.index("-vnc") + 1] == "[::1]:0,to=999,password=on"


def test_opened_files_reach_qemu_by_descriptor_and_keep_the_drive_ids() -> None:
    """Disks become pinned json: chains (commas doubled for QemuOpts) under the same
    ``disk{index}`` ids; kernel and initrd become /proc/self/fd names."""
    vm = config(disks=["/r/a.qcow2", "/r/b.raw"], kernel="/r/k", initrd="/r/i")
    chains = [PinnedChain((PinnedImage("qcow2", "/proc/self/fd/7"),
                           PinnedImage("raw", "/proc/self/fd/8")), (7, 8)),
              PinnedChain((PinnedImage("raw", "/proc/self/fd/9"),), (9,))]
    opened = OpenedFiles(drives=chains, kernel=10, initrd=11)
    argv = build_argv(vm, VMPaths.for_vm("/r", "vm1"), "tcg", opened=opened)
    drives = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-drive"]
    assert drives == [
        "file=json:" + chains[0].spec()[5:].replace(",", ",,") + ",if=virtio,id=disk0",
        "file=json:" + chains[1].spec()[5:].replace(",", ",,") + ",if=virtio,id=disk1",
    ]
    assert '"backing":{"driver":"raw"' in chains[0].spec()
    assert argv[argv.index("-kernel") + 1] == "/proc/self/fd/10"
    assert argv[argv.index("-initrd") + 1] == "/proc/self/fd/11"
    assert opened.fds == (7, 8, 9, 10, 11)
    assert "/r/a.qcow2" not in " ".join(argv) and "/r/k" not in argv
    with pytest.raises(IllegalValue):
        build_argv(vm, VMPaths.for_vm("/r", "vm1"), "tcg", opened=OpenedFiles(chains[:1]))


@pytest.mark.parametrize("bad", [
    {"network": "bridge:"}, {"network": "bridge:a,b"}, {"network": "bridge:x" * 16},
    {"network": "tap"}, {"port_forwards": [[80, 80]]},
    {"network": "user", "port_forwards": [[80, 80], [80, 81]]},
    {"network": "user", "port_forwards": [[0, 80]]}, {"cpus": 0}, {"mac": "00:11:22:33:44:55"},
    {"vnc_listen": "a,b"},
])
def test_bad_device_settings_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(IllegalValue):
        config(**bad)


def test_the_saved_state_fingerprint_covers_cpus_network_and_display() -> None:
    base = config(network="user")
    for changed in (config(network="user", cpus=2), config(network=None),
                    config(network="bridge:br0"), config(network="user", vga=True),
                    config(network="user", mac="52:54:00:00:00:01"),
                    config(network="user", port_forwards=[[8080, 80]])):
        assert config_fingerprint(changed) != config_fingerprint(base)
    # The VNC address is host-side only: a restore may listen elsewhere.
    assert config_fingerprint(config(network="user", vnc_listen="0.0.0.0")) \
        == config_fingerprint(base)


def test_config_round_trips_through_json() -> None:
    original = config(cpus=2, network="user", port_forwards=[[8080, 80]], vga=True,
                      vnc_listen="127.0.0.1", mac="52:54:00:01:02:03")
    assert VMConfig.from_json(original.to_json()) == original


def test_serial_log_rotation_keeps_one_generation_and_reads_across_it(tmp_path: Path) -> None:
    paths = VMPaths(tmp_path / "vm")
    paths.directory.mkdir()
    assert not rotate_serial_log(paths, 100)  # no log yet
    paths.serial_log.write_bytes(b"a" * 150)
    assert rotate_serial_log(paths, 100)
    assert paths.serial_log.stat().st_size == 0
    assert paths.serial_log_rotated.read_bytes() == b"a" * 150
    with open(paths.serial_log, "ab") as appender:  # as QEMU writes: O_APPEND
        appender.write(b"b" * 20)
    assert not rotate_serial_log(paths, 100)
    assert read_console(paths, 30) == "a" * 10 + "b" * 20
    assert read_console(paths, 5) == "b" * 5
    paths.serial_log.write_bytes(b"c" * 200)
    assert rotate_serial_log(paths, 100)
    assert paths.serial_log_rotated.read_bytes() == b"c" * 200  # the older one is gone
