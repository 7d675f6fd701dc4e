"""The script registry (`api.scripts`): every script file has its one line, and a
wrapper puts keyword arguments where the script reads them, or refuses them."""

from __future__ import annotations

import re
from importlib import resources

import pytest
import redis

from api.protocol import records, vm
from api.protocol import scripts as lua
from api.scripts import Scripts


def script_files() -> set[str]:
    """The scripts of `api/protocol/lua/`, less the libraries others ``-- uses:``."""
    folder = resources.files(lua.__package__).joinpath("lua")
    names = {entry.name.removesuffix(".lua") for entry in folder.iterdir()
             if entry.name.endswith(".lua")}
    used = {line.removeprefix(lua.USES).strip() for name in names
            for line in folder.joinpath(f"{name}.lua").read_text("utf-8").splitlines()
            if line.startswith(lua.USES)}
    return names - used


def test_every_script_file_is_registered_once() -> None:
    assert sorted(spec.name for spec in Scripts.specs()) == sorted(script_files())


def test_a_wrapper_places_keys_then_arguments_in_order() -> None:
    spec = Scripts.task_start
    numkeys, arguments = spec.arguments({"record": "r", "lease": "l", "running": "s",
                                         "now": "1.5", "worker": "w", "lease_ms": 10,
                                         "task_id": "t"})
    assert (numkeys, arguments) == (3, ["r", "l", "s", "1.5", "w", 10, "t"])
    numkeys, arguments = Scripts.vm_records.arguments(
        {"records": ["a", "b"], "fields": ("name", "state")})
    assert (numkeys, arguments) == (2, ["a", "b", "name", "state"])
    # An empty string is a value, not a missing optional argument.
    _, arguments = Scripts.vm_transition.arguments(
        {"record": "r", "events": "e", "allowed": "1", "state": 2, "now": "0",
         "max_events": 9, "host": ""})
    assert arguments[-1] == ""


def test_a_wrapper_refuses_unknown_missing_and_misplaced_arguments() -> None:
    with pytest.raises(TypeError, match="unknown"):
        Scripts.task_seal.arguments({"record": "r", "recrod": "r"})
    with pytest.raises(TypeError, match="missing"):
        Scripts.task_seal.arguments({})
    with pytest.raises(TypeError, match="without 'host_running'"):
        Scripts.task_start.arguments({"record": "r", "lease": "l", "running": "s",
                                      "deadlines": "d", "now": "1", "worker": "w",
                                      "lease_ms": 1, "task_id": "t"})


def test_the_registry_is_built_once_per_client() -> None:
    one, two = redis.Redis(port=1), redis.Redis(port=1)
    assert Scripts.of(one) is Scripts.of(one)
    assert Scripts.of(one) is not Scripts.of(two)
    assert Scripts.of(one).task_seal.sha == Scripts.of(two).task_seal.sha
    assert {script.spec.name for script in Scripts.of(one)} == script_files()


HASH_CALL = re.compile(r"redis\.call\('H(?:SET|GET|MGET|INCRBY)', KEYS\[1\],([^)]*)\)")
IDENTIFIER = re.compile(r"'([a-z_]+)'")


def fields_spelled(prefix: str) -> set[str]:
    """The record fields the scripts named ``<prefix>*`` read or write by name."""
    found: set[str] = set()
    for name in script_files() | {"task_log", "task_metrics"}:
        if name.startswith(prefix):
            for call in HASH_CALL.finditer(lua.load(name)):
                found.update(IDENTIFIER.findall(call.group(1)))
    return found


def test_the_scripts_spell_the_fields_their_schema_names() -> None:
    task_fields = {v for k, v in vars(records.Field).items() if k.isupper()}
    vm_fields = {v for k, v in vars(vm.Field).items() if k.isupper()}
    assert {"state", "worker", "cancel_requested"} <= fields_spelled("task_") <= task_fields
    assert {"state", "host", "changed"} <= fields_spelled("vm_") <= vm_fields
