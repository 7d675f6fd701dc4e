"""The transfer settings: the advertised address, the port range, the stall bound, TLS."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from api.errors import InvalidArgumentError
from api.protocol import hresults
from api.settings import Settings
from workers.engines import nbd
from workers.engines.qemu_img.runner import Stall
from workers.engines.transfer_tls import PSK, X509, TransferCreds, check_peer, creds_of
from workers.failures import OperationFailed


def test_defaults_and_values() -> None:
    settings = Settings.from_env({})
    assert (settings.advertise_address, settings.transfer_ports) == ("127.0.0.1", (49152, 49407))
    settings = Settings.from_env({"VMTASK_ADVERTISE_ADDRESS": "10.0.0.2",
                                  "VMTASK_TRANSFER_PORTS": "50000-50010"})
    assert (settings.advertise_address, settings.transfer_ports) == ("10.0.0.2", (50000, 50010))


@pytest.mark.parametrize("ports", ["50000", "5-6", "50010-50000", "50000-70000", "a-b"])
def test_bad_port_ranges_are_refused(ports: str) -> None:
    with pytest.raises(InvalidArgumentError, match="VMTASK_TRANSFER_PORTS"):
        Settings.from_env({"VMTASK_TRANSFER_PORTS": ports})


def test_a_bad_address_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="VMTASK_ADVERTISE_ADDRESS"):
        Settings.from_env({"VMTASK_ADVERTISE_ADDRESS": "a b"})


def test_export_names_are_one_time_and_specs_are_json() -> None:
    assert nbd.new_export_name() != nbd.new_export_name()
    assert len(nbd.new_export_name()) >= 32
    spec = nbd.client_spec("::1", 50000, "x")
    assert spec.startswith("json:") and '"host":"::1"' in spec and '"port":"50000"' in spec


def test_stall_bound_and_tls_dir() -> None:
    settings = Settings.from_env({})
    assert (settings.transfer_stall_seconds, settings.transfer_tls_dir) == (60.0, None)
    settings = Settings.from_env({"VMTASK_TRANSFER_STALL_SECONDS": "5",
                                  "VMTASK_TRANSFER_TLS_DIR": "/etc/vmtask/tls"})
    assert (settings.transfer_stall_seconds, settings.transfer_tls_dir) == (5.0, "/etc/vmtask/tls")
    with pytest.raises(InvalidArgumentError, match="VMTASK_TRANSFER_STALL_SECONDS"):
        Settings.from_env({"VMTASK_TRANSFER_STALL_SECONDS": "0"})


def test_tls_specs_name_the_credentials_object() -> None:
    spec = nbd.client_spec("10.0.0.2", 50000, "x", tls=True)
    assert f'"tls-creds":"{nbd.TLS_OBJECT_ID}"' in spec
    assert "tls-creds" not in nbd.client_spec("10.0.0.2", 50000, "x")
    assert nbd.tls_object(TransferCreds(X509, "/etc/tls"), "client") == (
        f"tls-creds-x509,id={nbd.TLS_OBJECT_ID},dir=/etc/tls,endpoint=client")
    # A PSK client names its key in keys.psk; a server looks up whoever comes.
    assert nbd.tls_object(TransferCreds(PSK, "/etc/psk"), "client") == (
        f"tls-creds-psk,id={nbd.TLS_OBJECT_ID},dir=/etc/psk,endpoint=client,username=qemu")
    assert nbd.tls_object(TransferCreds(PSK, "/etc/psk"), "server") == (
        f"tls-creds-psk,id={nbd.TLS_OBJECT_ID},dir=/etc/psk,endpoint=server")
    assert TransferCreds(PSK, "/p").qmp_object("t", "client") == {
        "qom-type": "tls-creds-psk", "id": "t", "dir": "/p", "endpoint": "client",
        "username": "qemu"}
    with pytest.raises(OperationFailed, match="comma"):
        # would smuggle options into --object
        nbd.tls_object(TransferCreds(X509, "/etc/a,b"), "server")


def test_either_setting_chooses_the_credentials_of_every_transfer() -> None:
    assert creds_of(Settings.from_env({})) is None
    assert creds_of(Settings.from_env({"VMTASK_TRANSFER_TLS_DIR": "/t"})) == TransferCreds(
        X509, "/t")
    assert creds_of(Settings.from_env({"VMTASK_TRANSFER_PSK_DIR": "/p"})) == TransferCreds(
        PSK, "/p")


def test_both_tls_settings_at_once_are_refused() -> None:
    with pytest.raises(InvalidArgumentError,
                       match=r"VMTASK_TRANSFER_TLS_DIR.*VMTASK_TRANSFER_PSK_DIR.*not both"):
        Settings.from_env({"VMTASK_TRANSFER_TLS_DIR": "/t", "VMTASK_TRANSFER_PSK_DIR": "/p"})


@pytest.mark.parametrize(("mine", "theirs", "says"), [
    (None, X509, "has neither"), (None, PSK, "VMTASK_TRANSFER_PSK_DIR"),
    (X509, "", "unencrypted"), (PSK, "", "unencrypted"), (X509, PSK, "the same on both"),
    (PSK, X509, "the same on both")])
def test_hosts_of_different_credentials_do_not_transfer(mine: str | None, theirs: str,
                                                        says: str) -> None:
    creds = None if mine is None else TransferCreds(mine, "/d")
    with pytest.raises(OperationFailed, match=says) as caught:
        check_peer(creds, theirs, here="b", peer="a")
    assert caught.value.hresult == hresults.ACCESS_DENIED
    check_peer(creds, "" if mine is None else mine, here="b", peer="a")


def test_a_stall_is_neither_progress_nor_output_growth(tmp_path: Path) -> None:
    output = tmp_path / "copy.tmp"
    start = time.monotonic()
    stall = Stall(5, output)
    assert not stall.stuck(start + 4, start)
    assert stall.stuck(start + 6, start)  # no output yet, no progress
    output.write_bytes(b"x")
    assert not stall.stuck(start + 7, start)  # the output grew: the clock restarts
    assert not stall.stuck(start + 11, start)
    assert stall.stuck(start + 13, start)
    assert not stall.stuck(start + 13, start + 12)  # a progress record restarts it too
