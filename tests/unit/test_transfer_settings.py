"""The transfer settings: the advertised address and the port range."""

from __future__ import annotations

import pytest

from api.errors import InvalidArgumentError
from api.settings import Settings
from workers.engines import nbd


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
