"""TLS on the NBD channel between hosts (``VMTASK_TRANSFER_TLS_DIR``), with each host
in its own network namespace (`tests.netns`) and certificates for its own address."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from api import VirtualServer, VMTaskResult, VMVMState
from api.protocol import hresults
from tests.helpers import assert_succeeded as done
from tests.helpers import qemu_io
from tests.integration.test_disks import big_image
from tests.integration.test_netns_hosts import FAST, digest, files_under, offer_of, root
from tests.netns import Network, network  # noqa: F401 - fixture
from workers.devtools.sandbox import TlsFiles, make_qemu_tls_dir, make_tls_files

pytestmark = pytest.mark.slow


@pytest.fixture
def ca(tmp_path: Path) -> TlsFiles:
    return make_tls_files(tmp_path / "ca")


def start(net: Network, name: str, tls_dir: Path | None) -> None:
    """(Re)start the host's worker, with or without transfer TLS."""
    host = net.hosts[name]
    if host.worker is not None:
        host.worker.stop()
        host.worker = None
    env = dict(FAST)
    if tls_dir is not None:
        env["VMTASK_TRANSFER_TLS_DIR"] = str(tls_dir)
    net.start_worker(name, env=env)


@pytest.fixture
def tls(network: Network, ca: TlsFiles, tmp_path: Path  # noqa: F811
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
    done(vm.migrate("b"))
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
