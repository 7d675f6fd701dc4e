"""TLS on the channels between hosts, with each host in its own network namespace
(`tests.netns`): x509 certificates for its own address (``VMTASK_TRANSFER_TLS_DIR``)
or a pre-shared key (``VMTASK_TRANSFER_PSK_DIR``), for copies and moves alike."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api import VirtualServer, VMTaskResult, VMVMState
from api.protocol import hresults, keys
from tests.helpers import assert_succeeded as done
from tests.helpers import big_image, digest, qemu_io
from tests.netns import Network
from tests.netns_helpers import FAST, files_under, install_guest, offer_of, root
from workers.devtools.sandbox import TlsFiles, make_qemu_tls_dir, make_tls_files, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def ca(tmp_path: Path) -> TlsFiles:
    return make_tls_files(tmp_path / "ca")


def start(net: Network, name: str, tls_dir: Path | None, *,
          setting: str = "VMTASK_TRANSFER_TLS_DIR", **env: str) -> None:
    """(Re)start the host's worker, with or without transfer TLS."""
    host = net.hosts[name]
    if host.worker is not None:
        host.worker.stop()
        host.worker = None
    env = {**FAST, **env}
    if tls_dir is not None:
        env[setting] = str(tls_dir)
    net.start_worker(name, env=env)


@pytest.fixture
def tls(network: Network, ca: TlsFiles, tmp_path: Path
        ) -> Iterator[tuple[Network, dict[str, Path]]]:
    dirs = {}
    for name in ("a", "b"):
        host = network.add_host(name)
        dirs[name] = make_qemu_tls_dir(tmp_path / f"tls-{name}", ca, host.address)
        start(network, name, dirs[name])
    yield network, dirs


@pytest.fixture
def server(tls: tuple[Network, dict[str, Path]]) -> Iterator[VirtualServer]:
    net = tls[0]
    assert net.redis is not None
    with VirtualServer(net.redis.url, host="a", poll_interval=0.2) as vs:
        yield vs


def test_a_copy_over_tls_and_a_plain_client_is_refused(
        tls: tuple[Network, dict[str, Path]], server: VirtualServer) -> None:
    net = tls[0]
    a, b = net.hosts["a"], net.hosts["b"]
    source = big_image(root(net, "a"), "d/big.img", 64)
    net.throttle("a", 100)  # ~5 s: time to knock on the export meanwhile
    task = server.get_hard_disk("d/big.img").copy_to("b", "d/copy.img")
    offer = offer_of(server)
    assert offer["tls"] == "1" and offer["address"] == a.address
    # Even knowing the one-time name (from Redis), a client without TLS gets nothing.
    plain = b.run("qemu-img", "info", "--image-opts",
                  f"driver=nbd,host={a.address},port={offer['port']},export={offer['export']}")
    assert plain.returncode != 0
    assert "TLS negotiation required" in plain.stderr, plain.stderr
    done(task)
    assert digest(root(net, "b") / "d" / "copy.img") == digest(source)


def test_a_cold_move_over_tls(tls: tuple[Network, dict[str, Path]],
                              server: VirtualServer) -> None:
    net = tls[0]
    done(server.create_dynamic_virtual_hard_disk("d/v.qcow2", 8))
    qemu_io(root(net, "a") / "d" / "v.qcow2", "qcow2", "write -P 0x3c 0 1M")
    before = digest(root(net, "a") / "d" / "v.qcow2")
    vm = server.create_virtual_machine("tv", memory_mb=64, disks=["d/v.qcow2"], host="a",
                                       network=None)
    done(vm.create_snapshot("s1"))
    clone = vm.clone("tc", host="b", snapshot="s1")  # a full clone, the same channel
    done(clone)
    out = server.get_task(json.loads(server.redis.hget(keys.task_record(clone.id), "arguments")
                                     or "{}")["server_task_id"])
    assert out.wait_for_completion(10_000)
    assert any("(TLS: tls-creds-x509)" in line for line in out.log()), out.log()
    qemu_io(root(net, "b") / clone.snapshot().output["disks"][0], "qcow2",
            "read -P 0x3c 0 1M")
    done(vm.migrate("b"))  # with its tree
    assert vm.state is VMVMState.TurnedOff and vm.host == "b"
    assert digest(root(net, "b") / "d" / "v.qcow2") == before


def test_tls_on_one_side_only_is_refused_before_any_byte_moves(
        tls: tuple[Network, dict[str, Path]], server: VirtualServer) -> None:
    net, dirs = tls
    done(server.create_dynamic_virtual_hard_disk("d/x.qcow2", 8))
    disk = server.get_hard_disk("d/x.qcow2")
    start(net, "b", None)  # b has no certificates: it cannot read a's TLS export
    task = disk.copy_to("b", "d/y.qcow2")
    assert task.wait_for_completion(60_000)
    assert (task.result, task.error) == (VMTaskResult.UnexpectedError, hresults.ACCESS_DENIED)
    assert "VMTASK_TRANSFER_TLS_DIR" in task.error_description
    start(net, "b", dirs["b"])
    start(net, "a", None)  # a serves in clear now: b, which requires TLS, refuses
    task = disk.copy_to("b", "d/y.qcow2")
    assert task.wait_for_completion(60_000)
    assert (task.result, task.error) == (VMTaskResult.UnexpectedError, hresults.ACCESS_DENIED)
    assert "unencrypted" in task.error_description
    assert files_under(root(net, "b")) == []


def test_a_server_certificate_for_another_address_is_refused(
        tls: tuple[Network, dict[str, Path]], server: VirtualServer, ca: TlsFiles,
        tmp_path: Path) -> None:
    net = tls[0]
    done(server.create_dynamic_virtual_hard_disk("d/x.qcow2", 8))
    # Signed by the right CA, but for an address that is not a's.
    start(net, "a", make_qemu_tls_dir(tmp_path / "elsewhere", ca, "192.0.2.7"))
    task = server.get_hard_disk("d/x.qcow2").copy_to("b", "d/y.qcow2")
    assert task.wait_for_completion(60_000)
    assert task.result is VMTaskResult.UnexpectedError
    assert "Certificate does not match the hostname" in task.error_description
    assert files_under(root(net, "b")) == []


def test_a_copy_over_a_pre_shared_key(tls: tuple[Network, dict[str, Path]],
                                      server: VirtualServer, tmp_path: Path) -> None:
    net, dirs = tls
    a, b = net.hosts["a"], net.hosts["b"]
    psk = tmp_path / "psk"
    psk.mkdir()
    (psk / "keys.psk").write_text(f"qemu:{os.urandom(32).hex()}\n")
    for name in ("a", "b"):
        start(net, name, psk, setting="VMTASK_TRANSFER_PSK_DIR")
    source = big_image(root(net, "a"), "d/big.img", 64)
    net.throttle("a", 100)  # ~5 s: time to knock on the export meanwhile
    task = server.get_hard_disk("d/big.img").copy_to("b", "d/copy.img")
    offer = offer_of(server)
    assert (offer["tls"], offer["creds"]) == ("1", "psk")
    plain = b.run("qemu-img", "info", "--image-opts",
                  f"driver=nbd,host={a.address},port={offer['port']},export={offer['export']}")
    assert plain.returncode != 0
    assert "TLS negotiation required" in plain.stderr, plain.stderr
    done(task)
    assert digest(root(net, "b") / "d" / "copy.img") == digest(source)
    # A host of certificates and a host of a key have no channel in common: refused
    # before any byte moves, naming both settings.
    start(net, "b", dirs["b"])
    task = server.get_hard_disk("d/big.img").copy_to("b", "d/other.img")
    assert task.wait_for_completion(60_000)
    assert (task.result, task.error) == (VMTaskResult.UnexpectedError, hresults.ACCESS_DENIED)
    assert "VMTASK_TRANSFER_PSK_DIR" in task.error_description
    assert "VMTASK_TRANSFER_TLS_DIR" in task.error_description
    assert not (root(net, "b") / "d" / "other.img").exists()


def test_a_live_migration_over_x509(tls: tuple[Network, dict[str, Path]],
                                    server: VirtualServer) -> None:
    net, dirs = tls
    a, b = net.hosts["a"], net.hosts["b"]
    # 8 MiB/s for the mirror: a few seconds to knock on the destination's exports.
    start(net, "a", dirs["a"], VMTASK_MIGRATE_MAX_BANDWIDTH=str(8 << 20))
    install_guest(net)
    done(server.create_dynamic_virtual_hard_disk("d/l.qcow2", 64))
    qemu_io(root(net, "a") / "d" / "l.qcow2", "qcow2", "write -P 0x6b 1M 32M")
    vm = server.create_virtual_machine(
        "lv", memory_mb=128, disks=["d/l.qcow2"], kernel="guest/vmlinuz",
        initrd="guest/initrd.gz", append="console=ttyS0 quiet panic=-1", guest_agent=True,
        host="a", network=None)
    done(vm.startup())
    wait_until(lambda: vm.guest_os.is_heartbeating, 90, "the guest agent on a")
    start(net, "b", None)  # no certificates on b: refused, the guest runs on at a
    task = vm.migrate("b")
    assert task.wait_for_completion(60_000)
    assert (task.result, task.error) == (VMTaskResult.UnexpectedError, hresults.ACCESS_DENIED)
    assert "VMTASK_TRANSFER_TLS_DIR" in task.error_description
    assert vm.state is VMVMState.Running and vm.host == "a"
    assert files_under(root(net, "b")) == ["guest/initrd.gz", "guest/vmlinuz"]
    start(net, "b", dirs["b"])
    task = vm.migrate("b")
    arguments = json.loads(server.redis.hget(keys.task_record(task.id), "arguments"))
    transfer = keys.transfer(arguments["transfer_id"])

    def incoming() -> dict[str, Any] | None:
        raw = server.redis.hget(transfer, "incoming")
        return dict(json.loads(raw)) if raw else None

    offer = wait_until(incoming, 60, "the destination's exports")
    assert offer["address"] == b.address
    # The destination QEMU's NBD server (certificates for b's address) wants TLS.
    plain = a.run("qemu-img", "info", "--image-opts",
                  f"driver=nbd,host={b.address},port={offer['nbd_port']},"
                  f"export={offer['exports'][0]}")
    assert not task.is_complete  # the client came while the disk was on its way
    assert plain.returncode != 0
    assert "TLS negotiation required" in plain.stderr, plain.stderr
    done(task)
    assert vm.state is VMVMState.Running and vm.host == "b"
    wait_until(lambda: vm.guest_os.is_heartbeating, 60, "the guest agent through b")
    done(vm.turn_off())
    qemu_io(root(net, "b") / "d" / "l.qcow2", "qcow2", "read -P 0x6b 1M 32M")
    assert not (root(net, "a") / "d" / "l.qcow2").exists()
    done(vm.delete())
