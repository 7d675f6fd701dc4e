"""Hosts as separate machines (`tests.netns`): each worker in its own network namespace,
reaching Redis and the other host only through a bridge, by address.  Faults are made
in the network: a partition of two hosts, a host's cable pulled, kill -9 of a worker."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from api import VirtualServer, VMTaskResult, VMVMState
from api.protocol import hresults, keys
from tests.helpers import assert_succeeded as done
from tests.integration.test_disks import big_image
from tests.netns import Network, network, wait_live  # noqa: F401 - fixture
from workers.devtools.sandbox import wait_until

pytestmark = pytest.mark.slow
S = VMVMState
LEASE = 6.0
STALL = 5.0
# Worker settings: a short heartbeat, lease and stall bound, so losses show within seconds.
FAST = {"VMTASK_HEARTBEAT_SECONDS": "2", "VMTASK_LEASE_SECONDS": str(int(LEASE)),
        "VMTASK_TRANSFER_STALL_SECONDS": str(int(STALL))}


@pytest.fixture
def net(network: Network) -> Iterator[Network]:  # noqa: F811
    for name in ("a", "b"):
        network.add_host(name)
    for name in ("a", "b"):
        network.start_worker(name, env=FAST)
    yield network


@pytest.fixture
def server(net: Network) -> Iterator[VirtualServer]:
    assert net.redis is not None
    with VirtualServer(net.redis.url, host="a", poll_interval=0.2) as vs:
        yield vs


def root(net: Network, name: str) -> Path:
    worker = net.hosts[name].worker
    assert worker is not None
    worker.storage_root.mkdir(parents=True, exist_ok=True)
    return worker.storage_root


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_under(path: Path) -> list[str]:
    """The files of a storage root, without its lock files."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")
                  if not p.is_dir() and ".vmtask-locks" not in p.parts)


def _address(hex_pair: str) -> tuple[str, int]:
    address, port = hex_pair.split(":")
    return socket.inet_ntoa(bytes.fromhex(address)[::-1]), int(port, 16)


def established(net: Network, name: str) -> set[tuple[tuple[str, int], tuple[str, int]]]:
    """(local, remote) of every established TCP connection in the host's namespace."""
    worker = net.hosts[name].worker
    assert worker is not None and worker.proc is not None
    lines = Path(f"/proc/{worker.proc.pid}/net/tcp").read_text().splitlines()[1:]
    return {(_address(f[1]), _address(f[2])) for f in map(str.split, lines) if f[3] == "01"}


def offer_of(server: VirtualServer) -> dict[str, str]:
    def found() -> dict[str, str] | None:
        for key in server.redis.keys(keys.transfer("*")):
            offer = server.redis.hgetall(key)
            if "port" in offer:
                return dict(offer)
        return None

    return dict(wait_until(found, 60, "the source to announce its export"))


def serve_task_of(server: VirtualServer, pull_id: str) -> str:
    raw = server.redis.hget(keys.task_record(pull_id), "arguments")
    assert raw is not None
    return str(json.loads(raw)["server_task_id"])


# -- copies between namespaces ---------------------------------------------------------


def test_a_copy_goes_through_the_advertised_address(net: Network,
                                                    server: VirtualServer) -> None:
    a, b = net.hosts["a"], net.hosts["b"]
    assert server.host_status()["a"]["transfer_address"] == a.address
    source = big_image(root(net, "a"), "d/big.img", 96)
    before = digest(source)
    net.throttle("a", 200)  # ~4 s for 96 MiB: long enough to look at the connection
    task = server.get_hard_disk("d/big.img").copy_to("b", "d/copy.img")
    offer = offer_of(server)
    port = int(offer["port"])
    assert offer["address"] == a.address
    # The export is bound to the advertised address only, and B's 127.0.0.1 is its own.
    assert not a.can_connect("127.0.0.1", port)
    assert not b.can_connect("127.0.0.1", port)
    wait_until(lambda: any(local == (a.address, port) and remote[0] == b.address
                           for local, remote in established(net, "a")),
               30, "B's connection to A's advertised address")
    done(task)
    assert digest(root(net, "b") / "d" / "copy.img") == before == digest(source)
    assert files_under(root(net, "b")) == ["d/copy.img"]


def test_a_partition_mid_copy_ends_the_copy_and_leaves_nothing(
        net: Network, server: VirtualServer) -> None:
    source = big_image(root(net, "a"), "d/big.img", 96)
    before = digest(source)
    net.throttle("a", 100)
    task = server.get_hard_disk("d/big.img").copy_to("b", "d/copy.img")
    wait_until(lambda: task.percent_completed >= 5, 60, "the copy to be under way")
    net.partition("a", "b")
    started = time.monotonic()
    # Without the stall bound TCP would keep the copy waiting for many minutes.
    assert task.wait_for_completion(int((STALL + 30) * 1000)), "the copy hangs"
    took = time.monotonic() - started
    snap = task.snapshot()
    print(f"partition mid-copy: ended {snap.result.name} after {took:.1f} s")
    assert (snap.result, snap.error) == (VMTaskResult.TimeOutError, hresults.TIMEOUT)
    assert "received nothing" in snap.error_description and "from a" in snap.error_description
    assert snap.percent_completed < 100
    assert files_under(root(net, "b")) == []
    assert digest(source) == before
    serve = server.get_task(serve_task_of(server, task.id))
    assert serve.wait_for_completion(30_000)
    net.heal("a", "b")
    done(server.get_hard_disk("d/big.img").copy_to("b", "d/again.img"))
    assert digest(root(net, "b") / "d" / "again.img") == before
