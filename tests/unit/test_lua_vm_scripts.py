"""The VM record's Lua scripts (`api/protocol/lua/vm_*.lua`, `host_vm_records.lua`) on a
real redis-server, each called as the product calls it: create, state transition,
configure, delete, the fenced move of a migration and a live source's way back.  Every
transition with the exact fields, sets and events it leaves, and every refusal with its
reply and nothing written."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from api import VirtualServer
from api.enums import VMVMState as S
from api.errors import InvalidStateError
from api.protocol import keys
from api.protocol.vmstate import ALLOWED, EVENTS_MAXLEN, allowed_csv
from api.scripts import Scripts
from api.settings import Settings
from api.vmargs import to_args
from workers.devtools.sandbox import RedisServer
from workers.failures import IllegalValue
from workers.runtime import TaskRun, WorkerRedis
from workers.tasks.live_migration import DESTINATION, wake_key
from workers.tasks.live_recovery import _fence
from workers.tasks.migration import move_record
from workers.tasks.vms import host_vms, transition

VM = "vm1"
RECORD = keys.vm_record(VM)
MOVES = frozenset({S.TurnedOff, S.Saved})


@pytest.fixture
def settings(lua_redis: RedisServer, tmp_path: Path) -> Settings:
    return Settings(redis_url=lua_redis.url, host="h1", storage_root=tmp_path)


@pytest.fixture
def destination(settings: Settings) -> Iterator[TaskRun]:
    """A task on host h2, the destination of the moves here."""
    on_h2 = dataclasses.replace(settings, host="h2")
    conn = WorkerRedis(on_h2)
    yield TaskRun("mv", on_h2, conn)
    conn.client.close()


def create(db: redis.Redis, name: str = VM, host: str = "h1", state: S = S.TurnedOff) -> Any:
    """`VirtualServer.create_virtual_machine`'s call (api/vms.py)."""
    fields = {"name": name, "host": host, "state": str(int(state)), "memory_mb": "64"}
    return Scripts.of(db).vm_create(record=keys.vm_record(name), names=keys.VM_NAMES,
                                    host_vms=keys.host_vms(host), name=name,
                                    fields=to_args(fields))


def events(db: redis.Redis) -> list[dict[str, str]]:
    return [fields for _id, fields in db.xrange(keys.VM_EVENTS)]


# -- create ------------------------------------------------------------------------------


def test_a_create_writes_the_record_and_both_name_sets_unless_the_name_is_taken(
        db: redis.Redis) -> None:
    assert create(db) == 1
    assert db.hgetall(RECORD) == {"name": VM, "host": "h1", "state": "1", "memory_mb": "64"}
    assert db.smembers(keys.VM_NAMES) == {VM}
    assert db.smembers(keys.host_vms("h1")) == {VM}
    assert create(db, host="h2", state=S.Saved) == 0  # names are unique across hosts
    assert db.hgetall(RECORD)["host"] == "h1"
    assert not db.exists(keys.host_vms("h2"))
    # Without the host set among its keys (the key is optional): the names set only.
    assert Scripts.of(db).vm_create(record=keys.vm_record("c1"), names=keys.VM_NAMES,
                                    name="c1", fields=["name", "c1", "host", "h1"]) == 1
    assert db.smembers(keys.VM_NAMES) == {VM, "c1"}
    assert db.smembers(keys.host_vms("h1")) == {VM}


# -- transition --------------------------------------------------------------------------


def test_a_transition_sets_the_state_and_adds_one_event(db: redis.Redis) -> None:
    create(db)
    before = time.time()
    assert transition(db, VM, ALLOWED["startup"], S.TurningOn) is S.TurnedOff
    fields = db.hgetall(RECORD)
    assert fields["state"] == str(int(S.TurningOn))
    assert before <= float(fields["changed"]) <= time.time()
    assert events(db) == [{"name": VM, "host": "h1", "old": "1", "new": "3",
                           "time": fields["changed"]}]
    # To the state it already is in: allowed, and nothing to tell anyone.
    assert transition(db, VM, frozenset({S.TurningOn}), S.TurningOn) is S.TurningOn
    assert db.hget(RECORD, "changed") == fields["changed"] and len(events(db)) == 1


def test_a_transition_is_refused_from_a_state_not_allowed_elsewhere_or_missing(
        db: redis.Redis) -> None:
    with pytest.raises(IllegalValue, match="No VM named 'vm1'"):
        transition(db, VM, ALLOWED["startup"], S.TurningOn)
    create(db, state=S.Running)
    before = db.hgetall(RECORD)
    with pytest.raises(InvalidStateError, match="is Running: cannot go to TurningOn"):
        transition(db, VM, ALLOWED["startup"], S.TurningOn)
    with pytest.raises(InvalidStateError, match="no longer on h2"):
        transition(db, VM, ALLOWED["pause"], S.Paused, host="h2")  # a stale watch's view
    assert db.hgetall(RECORD) == before and events(db) == []
    assert transition(db, VM, ALLOWED["pause"], S.Paused, host="h1") is S.Running


# -- configure ---------------------------------------------------------------------------


def configure(db: redis.Redis, **fields: str) -> Any:
    """`VirtualMachine.configure`'s call (api/vms.py)."""
    return Scripts.of(db).vm_configure(record=RECORD, allowed=allowed_csv(ALLOWED["configure"]),
                                       fields=to_args(fields))


def test_a_configure_lands_only_while_the_vm_is_turned_off(db: redis.Redis) -> None:
    assert configure(db, memory_mb="128") == ["MISSING", ""]
    assert not db.exists(RECORD)
    create(db)
    assert configure(db, memory_mb="128", cpus="2") == ["OK", "1"]
    assert db.hmget(RECORD, "memory_mb", "cpus") == ["128", "2"]
    db.hset(RECORD, "state", str(int(S.TurningOn)))  # a start slipped in first
    assert configure(db, memory_mb="256") == ["REFUSED", "3"]
    assert db.hget(RECORD, "memory_mb") == "128"


# -- delete ------------------------------------------------------------------------------


def delete(db: redis.Redis, name: str = VM) -> Any:
    """The VM delete task's last step (workers.tasks.vms.delete)."""
    return Scripts.of(db).vm_delete(
        record=keys.vm_record(name), names=keys.VM_NAMES, events=keys.VM_EVENTS, name=name,
        now=repr(time.time()), max_events=EVENTS_MAXLEN, state=int(S.DeleteMachine),
        host_vms_prefix=keys.HOST_VMS_PREFIX)


def test_a_delete_removes_the_record_and_its_names_only_from_delete_machine(
        db: redis.Redis) -> None:
    assert delete(db) == "MISSING"
    create(db)
    assert delete(db) == "1"  # not begun by the delete task
    assert db.exists(RECORD) and db.sismember(keys.VM_NAMES, VM)
    db.hset(RECORD, "state", str(int(S.DeleteMachine)))
    assert delete(db) == "OK"
    assert not db.exists(RECORD)
    assert not db.sismember(keys.VM_NAMES, VM)
    assert not db.sismember(keys.host_vms("h1"), VM)
    (event,) = events(db)
    assert {k: event[k] for k in ("name", "host", "old", "new")} == {
        "name": VM, "host": "h1", "old": "10", "new": ""}


# -- the move and the way back -----------------------------------------------------------


def test_a_move_names_the_destination_only_if_the_record_names_the_source(
        db: redis.Redis, destination: TaskRun) -> None:
    run = destination
    assert move_record(run, VM, "h1", MOVES) == "MISSING"
    create(db, state=S.Running)
    assert move_record(run, VM, "h1", MOVES) == "REFUSED"  # a running VM moves only live
    create(db, "vm2", host="h3")
    assert move_record(run, "vm2", "h1", MOVES) == "MOVED"  # it went elsewhere meanwhile
    assert db.hget(RECORD, "host") == "h1" and events(db) == []

    db.hset(RECORD, "state", str(int(S.Saved)))
    assert move_record(run, VM, "h1", MOVES) == "OK"
    fields = db.hgetall(RECORD)
    assert fields["host"] == "h2" and fields["state"] == "2"
    assert not db.sismember(keys.host_vms("h1"), VM)
    assert db.sismember(keys.host_vms("h2"), VM)
    assert events(db) == [{"name": VM, "host": "h2", "old": "2", "new": "2",
                           "time": fields["changed"]}]
    # Sent again after a lost reply: the record names this host, so it was ours.
    assert move_record(run, VM, "h1", MOVES) == "OK"
    assert len(events(db)) == 1


def test_a_source_that_takes_the_guest_back_fences_the_destination_out(
        db: redis.Redis, settings: Settings, destination: TaskRun) -> None:
    transfer = keys.transfer("x1")
    create(db, state=S.Running)
    assert _fence(db, settings, VM, "x1") == "h1"  # the source keeps it
    assert db.hget(transfer, "abort") == "1"
    assert db.lrange(wake_key(transfer, DESTINATION), 0, -1) == ["abort"]
    assert db.ttl(transfer) > 0 and db.ttl(wake_key(transfer, DESTINATION)) > 0
    run = destination
    live = frozenset({S.Running, S.Paused})
    assert move_record(run, VM, "h1", live, transfer) == "ABORTED"
    assert db.hget(RECORD, "host") == "h1" and events(db) == []


def test_a_source_cannot_take_back_a_guest_the_destination_took_over(
        db: redis.Redis, settings: Settings, destination: TaskRun) -> None:
    transfer = keys.transfer("x2")
    create(db, state=S.Running)
    run = destination
    assert move_record(run, VM, "h1", frozenset({S.Running}), transfer) == "OK"
    assert _fence(db, settings, VM, "x2") == "h2"  # the owner now
    assert db.hget(transfer, "abort") is None
    assert db.llen(wake_key(transfer, DESTINATION)) == 0


# -- a host's own VMs --------------------------------------------------------------------


def test_a_host_reads_only_the_vms_it_owns(db: redis.Redis, settings: Settings) -> None:
    create(db, "b", state=S.Running)
    create(db, "a")
    create(db, "gone")
    db.delete(keys.vm_record("gone"))  # deleted between two reads: left out
    db.hset(keys.vm_record("b"), "host", "h9")  # moved, the set not yet updated
    db.sadd(keys.host_vms("h1"), "b")
    assert host_vms(db, settings) == [{"name": "a", "host": "h1", "state": "1"}]


def test_a_listing_reads_every_vm_in_one_script_call_and_skips_a_gone_one(
        db: redis.Redis, settings: Settings) -> None:
    create(db, "a")
    create(db, "b", host="h2", state=S.Running)
    db.hset(keys.vm_record("b"), mapping={"memory_mb": "256", "cpus": "2"})
    create(db, "gone")
    db.delete(keys.vm_record("gone"))  # deleted between the two round trips
    with VirtualServer(settings.redis_url, host="h1") as server:
        listed = server.virtual_machines
    assert [(vm.name, vm.host, vm.memory_mb, vm.cpus) for vm in listed] == [
        ("a", "h1", 64, 1), ("b", "h2", 256, 2)]
