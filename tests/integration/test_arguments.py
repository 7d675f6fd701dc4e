"""Every public entry point, fed anything: it succeeds or raises an `api.errors`
exception within seconds, and the worker still serves afterwards."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api import VirtualServer, VMHardDiskType, VMTask, errors
from api.disks import HardDisk
from api.protocol import hresults
from tests.helpers import assert_succeeded
from workers.devtools.sandbox import RedisServer, WorkerProcess

CALL_SECONDS = 5.0
BOUNDED = settings(max_examples=60, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.function_scoped_fixture,
                                          HealthCheck.too_slow])

# Values that broke entry points: lone surrogates, NULs, wrong types, huge numbers.
NASTY_TEXT = st.sampled_from(["\ud800", "a\udcff.vhd", "x\x00.vhd", "", " ", "../a.vhd",
                              "/etc/a.vhd", "a" * 5000 + ".vhd", "web1\n", "$", "0", "0-0",
                              "garbage", "99999999999999999999999"])
ANY_TEXT = st.one_of(NASTY_TEXT, st.text(max_size=40))
PATHS = st.one_of(ANY_TEXT, ANY_TEXT.map(lambda s: f"fuzz/{s}.vhd"),
                  ANY_TEXT.map(lambda s: f"fuzz/{s}.qcow2"))
ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                      st.binary(max_size=8), st.lists(st.integers(), max_size=3), ANY_TEXT)
INTS = st.one_of(st.integers(min_value=-(2**70), max_value=2**70),
                 st.sampled_from([-1, 0, 1, 4_000_000, 4_000_001, 2**63]), ANY_VALUE)
DISK_TYPES = st.one_of(st.sampled_from(list(VMHardDiskType)), INTS)


@pytest.fixture(scope="module")
def fuzz_server(redis_server: RedisServer, alpha: WorkerProcess) -> Iterator[VirtualServer]:
    with VirtualServer(redis_server.url, host="alpha", poll_interval=0.5) as vs:
        yield vs


def attempt(call: Callable[[], Any]) -> None:
    """The call returns or raises `errors.VMTaskError`, within CALL_SECONDS; a task it
    queued is cancelled at once, so fuzzing never makes the worker do real work."""
    started = time.monotonic()
    try:
        result = call()
    except errors.VMTaskError:
        result = None
    assert time.monotonic() - started < CALL_SECONDS
    results = result if isinstance(result, list) else [result]
    for item in results:
        if isinstance(item, VMTask):
            try:
                item.cancel()
            except errors.VMTaskError:
                pass


@pytest.fixture(scope="module", autouse=True)
def worker_still_serves(fuzz_server: VirtualServer) -> Iterator[None]:
    yield
    assert_succeeded(fuzz_server.ping(), timeout=30_000)


@BOUNDED
@given(path=PATHS, size=INTS, host=st.one_of(st.none(), st.just("alpha"), ANY_TEXT))
def test_create_disks(fuzz_server: VirtualServer, path: Any, size: Any, host: Any) -> None:
    attempt(lambda: fuzz_server.create_fixed_virtual_hard_disk(path, size, host=host))
    attempt(lambda: fuzz_server.create_dynamic_virtual_hard_disk(path, size, host=host))


@BOUNDED
@given(path=PATHS, parent=PATHS, drive=ANY_TEXT, read_only=ANY_VALUE)
def test_create_linked_disks(fuzz_server: VirtualServer, path: Any, parent: Any, drive: Any,
                             read_only: Any) -> None:
    attempt(lambda: fuzz_server.create_differencing_virtual_hard_disk(path, parent))
    attempt(lambda: fuzz_server.create_host_drive_virtual_hard_disk(path, drive,
                                                                     read_only=read_only))


@BOUNDED
@given(path=PATHS, destination=PATHS, disk_type=DISK_TYPES)
def test_disk_operations(fuzz_server: VirtualServer, path: Any, destination: Any,
                         disk_type: Any) -> None:
    attempt(lambda: fuzz_server.get_hard_disk(path))
    disk = HardDisk(server=fuzz_server, host="alpha", file="fuzz/none.qcow2",
                    type=VMHardDiskType.Differencing, format="qcow2", size_in_guest=0,
                    size_on_host=0, host_free_disk_space=0, host_drive=None, parent=None)
    attempt(lambda: disk.convert(destination, disk_type))
    attempt(lambda: disk.merge_to(destination, disk_type))


@BOUNDED
@given(name=ANY_TEXT, memory=INTS,
       disks=st.one_of(ANY_VALUE, st.lists(PATHS, max_size=3), st.tuples(PATHS)),
       kernel=st.one_of(st.none(), PATHS), append=st.one_of(st.none(), ANY_VALUE))
def test_virtual_machines(fuzz_server: VirtualServer, name: Any, memory: Any, disks: Any,
                          kernel: Any, append: Any) -> None:
    attempt(lambda: fuzz_server.find_virtual_machine(name))
    attempt(lambda: fuzz_server.create_virtual_machine(name, memory_mb=memory, disks=disks,
                                                       kernel=kernel, append=append))


@BOUNDED
@given(task_id=ANY_VALUE, timeout=INTS, since=ANY_VALUE, limit=INTS,
       state=st.one_of(st.none(), ANY_TEXT), host=st.one_of(st.none(), ANY_TEXT))
def test_tasks_and_events(fuzz_server: VirtualServer, task_id: Any, timeout: Any, since: Any,
                          limit: Any, state: Any, host: Any) -> None:
    attempt(lambda: fuzz_server.get_task(task_id))
    attempt(lambda: fuzz_server.tasks(state=state, host=host, limit=limit))
    attempt(lambda: fuzz_server.ping(duration_ms=timeout, steps=limit))
    # timeout_ms=0 must return at once; anything else is bounded here by 100 ms.
    bounded = timeout if isinstance(timeout, int) and 0 <= timeout <= 100 else 0
    attempt(lambda: list(fuzz_server.vm_events(since, timeout_ms=bounded)))
    forever = timeout is None or (isinstance(timeout, int) and not isinstance(timeout, bool)
                                  and (timeout == -1 or timeout > 100))
    attempt(lambda: None if forever else list(fuzz_server.vm_events("0", timeout_ms=timeout)))
    task = fuzz_server.ping()
    attempt(lambda: None if forever else task.wait_for_completion(timeout))


# -- the cases the issue found, one by one (each raised a raw library error before) --


@pytest.mark.parametrize("call", [
    lambda s: s.get_task("\ud800"),
    lambda s: s.find_virtual_machine("\ud800"),
    lambda s: s.create_virtual_machine("a\udcff"),
    lambda s: s.create_virtual_machine("vm-none", disks=None),
    lambda s: s.create_virtual_machine("vm-five", disks=5),
    lambda s: s.create_virtual_machine("vm-sur", disks=["a\udcff.vhd"]),
    lambda s: s.create_fixed_virtual_hard_disk("a\udcff.vhd", 1),
    lambda s: s.create_dynamic_virtual_hard_disk("\ud800", 1),
    lambda s: s.create_differencing_virtual_hard_disk("a.qcow2", "a\udcff.vhd"),
    lambda s: s.get_hard_disk("a\udcff.vhd"),
    lambda s: list(s.vm_events(since="garbage", timeout_ms=0)),
    lambda s: list(s.vm_events(since=None, timeout_ms=0)),
    lambda s: list(s.vm_events(timeout_ms=-2)),
    lambda s: list(s.vm_events(timeout_ms="1")),
], ids=["task-id", "find-vm", "vm-name", "disks-none", "disks-int", "disk-path", "fixed",
        "dynamic", "parent", "get-hard-disk", "since-garbage", "since-none", "timeout-neg",
        "timeout-str"])
def test_each_reported_bad_argument_is_an_api_error(fuzz_server: VirtualServer,
                                                    call: Callable[[VirtualServer], Any]) -> None:
    with pytest.raises(errors.VMTaskError) as caught:
        call(fuzz_server)
    assert isinstance(caught.value, ValueError)  # InvalidArgument/InvalidTimeout


def test_convert_destination_with_a_surrogate_is_an_api_error(
        fuzz_server: VirtualServer) -> None:
    disk = HardDisk(server=fuzz_server, host="alpha", file="x.qcow2",
                    type=VMHardDiskType.Dynamic, format="qcow2", size_in_guest=0,
                    size_on_host=0, host_free_disk_space=0, host_drive=None, parent=None)
    with pytest.raises(errors.InvalidArgumentError):
        disk.convert("a\udcff.vhd", VMHardDiskType.Dynamic)
    with pytest.raises(errors.InvalidArgumentError) as caught:
        disk.merge_to("../out.vhd", VMHardDiskType.Dynamic)
    assert caught.value.hresult == hresults.ACCESS_DENIED


def test_vm_events_with_timeout_zero_returns_at_once(fuzz_server: VirtualServer) -> None:
    started = time.monotonic()
    assert list(fuzz_server.vm_events(timeout_ms=0)) == []
    assert time.monotonic() - started < 1.0
    started = time.monotonic()
    list(fuzz_server.vm_events("0", timeout_ms=0))  # whatever is kept, then stop
    assert time.monotonic() - started < 2.0
