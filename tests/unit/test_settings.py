"""Settings from one table: every ``VMTASK_*`` variable is a `Settings` field whose
metadata holds its name and doc, and the configuration page, ``from_env``, the
unknown-variable warning and ``vmtask config`` are all driven from it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest

from api.settings import (
    OTHER_VARIABLES,
    PREFIX,
    REGENERATE,
    Settings,
    as_text,
    configuration_page,
    effective,
    unknown_variables,
    variables,
)

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "operations" / "configuration.md"
NAME = re.compile(r"\bVMTASK_[A-Z][A-Z0-9_]*[A-Z0-9]\b")


def test_the_committed_configuration_page_is_the_generated_one() -> None:
    assert PAGE.read_text() == configuration_page(), (
        f"{PAGE.relative_to(REPO)} is stale: regenerate it with `{REGENERATE}`")


def test_every_field_has_its_own_variable_and_a_doc() -> None:
    names = [spec.metadata["env"] for spec in fields(Settings)]
    assert len(names) == len(set(names)) == len(variables())
    for spec in fields(Settings):
        assert spec.metadata["env"].startswith(PREFIX), spec.name
        assert spec.metadata["doc"].strip(), spec.name
        assert f"`{spec.metadata['env']}`" in configuration_page()


def test_every_variable_the_docs_name_is_a_known_one() -> None:
    known = {*variables(), *OTHER_VARIABLES}
    for path in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        unknown = set(NAME.findall(path.read_text())) - known
        assert not unknown, f"{path.relative_to(REPO)} names unknown variables {unknown}"


def test_from_env_reads_back_each_value_as_its_variable_spells_it(tmp_path: Path) -> None:
    changed = replace(
        Settings(), host="h-1", storage_root=tmp_path, accel="tcg", lease_seconds=7.5,
        host_drive_allow=("/dev/sdb", "/srv/disks/"), save_max_bandwidth=1000,
        concurrency=3, sent_events=False, role="control", transfer_ports=(2000, 2010),
        transfer_psk_dir="/p", redis_wait_replicas=0, redis_failover_seconds=2.0,
        redis_url="redis://127.0.0.1:1/3")
    env = {name: as_text(getattr(changed, spec.name)) for name, spec in variables().items()}
    assert Settings.from_env(env) == changed


def test_a_misspelt_variable_is_found_with_the_closest_known_name() -> None:
    env = {"VMTASK_REDIS_TIMOUT_SECONDS": "3", "VMTASK_HOSTS": "a", "VMTASK_NOTHING_LIKE": "1",
           "VMTASK_HOST": "a", "VMTASK_CACHE_DIR": "/c", "PATH": "/bin"}
    assert unknown_variables(env) == [
        ("VMTASK_HOSTS", "VMTASK_HOST"),
        ("VMTASK_NOTHING_LIKE", None),
        ("VMTASK_REDIS_TIMOUT_SECONDS", "VMTASK_REDIS_TIMEOUT_SECONDS"),
    ]


def test_effective_settings_hide_url_passwords_in_userinfo_query_and_sentinels() -> None:
    for url in ("redis://worker:pw-Secret1@127.0.0.1:1/0",
                "redis://127.0.0.1:1/0?password=pw-Secret1",
                "sentinel://:pw-Secret1@s1:26379/0;sentinel://s2:26379"):
        shown = effective(Settings(redis_url=url))
        assert "pw-Secret1" not in json.dumps(shown), url
        assert "***" in shown["VMTASK_REDIS_URL"], url


def run_config(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(PREFIX)}
    # Wide enough that rich wraps no cell: the checks below look for whole paths,
    # which under xdist's deep temporary folders pass 80 columns.
    clean["COLUMNS"] = "400"
    return subprocess.run([sys.executable, "-m", "api.cli", *args, "config"],
                          capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**clean, **env, "PYTHONPATH": str(REPO)}, check=False)


@pytest.mark.parametrize("as_json", [False, True])
def test_vmtask_config_prints_the_settings_with_no_secret(tmp_path: Path, as_json: bool) -> None:
    password_file = tmp_path / "redis_password"
    password_file.write_text("pw-InTheFile9\n")
    extra = ("--json",) if as_json else ()
    in_file = run_config({"VMTASK_REDIS_URL": "redis://worker@127.0.0.1:1/0",
                          "VMTASK_REDIS_PASSWORD_FILE": str(password_file),
                          "VMTASK_LEASE_SECONDS": "9", "VMTASK_LEASE_SECOND": "9"}, *extra)
    in_url = run_config({"VMTASK_REDIS_URL": "redis://worker:pw-InTheUrl7@127.0.0.1:1/0"},
                        *extra)
    in_query = run_config({}, "--url", "redis://127.0.0.1:1/0?password=pw-InTheQuery5", *extra)
    for run, secret in ((in_file, "pw-InTheFile9"), (in_url, "pw-InTheUrl7"),
                        (in_query, "pw-InTheQuery5")):
        assert run.returncode == 0, run.stderr
        assert secret not in run.stdout + run.stderr
        assert "VMTASK_REDIS_URL" in run.stdout
    if as_json:
        document = json.loads(in_file.stdout)
        values = {row["variable"]: row for row in document["settings"]}
        assert values["VMTASK_REDIS_PASSWORD_FILE"]["value"] == str(password_file)
        assert values["VMTASK_LEASE_SECONDS"] == {"variable": "VMTASK_LEASE_SECONDS",
                                                  "value": "9", "set": True}
        assert document["unknown"] == [{"variable": "VMTASK_LEASE_SECOND",
                                        "closest": "VMTASK_LEASE_SECONDS"}]
        assert json.loads(in_url.stdout)["settings"][0]["value"] == \
            "redis://worker:***@127.0.0.1:1/0"
    else:
        assert str(password_file) in in_file.stdout
        assert "did you mean VMTASK_LEASE_SECONDS?" in in_file.stdout


def test_vmtask_config_refuses_a_bad_value_as_a_worker_would() -> None:
    run = run_config({"VMTASK_LEASE_SECONDS": "soon"})
    assert run.returncode == 2 and run.stdout == ""
    assert "VMTASK_LEASE_SECONDS must be a number" in run.stderr
