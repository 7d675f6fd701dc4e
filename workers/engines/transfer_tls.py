"""Which TLS credentials a host's transfers use: one decision for every channel.

Copies and cold migrations (qemu-nbd serving, qemu-img reading) and live migrations (the
destination QEMU's NBD server and migration listener, the source QEMU's mirrors and
migration) all take their credentials from here, so both settings cover every
transfer:

- ``VMTASK_TRANSFER_TLS_DIR``: QEMU's ``tls-creds-x509`` directory (``ca-cert.pem``,
  ``server-cert.pem``/``server-key.pem``, ``client-cert.pem``/``client-key.pem``).
  Both ends are verified: the server asks for a client certificate signed by the
  CA, and the client checks the server's certificate against the address it dials.
- ``VMTASK_TRANSFER_PSK_DIR``: QEMU's ``tls-creds-psk`` directory, whose ``keys.psk``
  holds ``qemu:<hex key>``, the same on every host.

Settings refuse both at once (`api.settings`), so a host has one kind or none, and
a transfer between hosts of different kinds is refused before any byte moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from api.protocol import hresults
from workers.failures import OperationFailed

if TYPE_CHECKING:
    from api.settings import Settings

X509 = "x509"
PSK = "psk"
SETTING = {X509: "VMTASK_TRANSFER_TLS_DIR", PSK: "VMTASK_TRANSFER_PSK_DIR"}
# The identity a PSK client presents, and the name of its key in keys.psk.
PSK_USERNAME = "qemu"


@dataclass(frozen=True)
class TransferCreds:
    """One host's transfer credentials: a QEMU ``tls-creds-*`` object's kind and dir."""

    kind: str
    directory: str

    @property
    def setting(self) -> str:
        return SETTING[self.kind]

    def _properties(self, endpoint: str) -> dict[str, str]:
        properties = {"dir": self.directory, "endpoint": endpoint}
        if self.kind == PSK and endpoint == "client":
            properties["username"] = PSK_USERNAME
        return properties

    def qmp_object(self, object_id: str, endpoint: str) -> dict[str, str]:
        """The ``object-add`` arguments of the credentials, in a running QEMU."""
        return {"qom-type": f"tls-creds-{self.kind}", "id": object_id,
                **self._properties(endpoint)}

    def object_arg(self, object_id: str, endpoint: str) -> str:
        """The ``--object`` value of the credentials, for qemu-nbd and qemu-img."""
        if "," in self.directory:  # would smuggle options into --object
            raise OperationFailed(f"The transfer TLS directory {self.directory!r} "
                                  "contains a comma")
        return ",".join([f"tls-creds-{self.kind}", f"id={object_id}",
                         *(f"{k}={v}" for k, v in self._properties(endpoint).items())])


def creds_of(settings: Settings) -> TransferCreds | None:
    """The host's transfer credentials; None: transfers in clear TCP."""
    if settings.transfer_tls_dir and settings.transfer_psk_dir:
        raise OperationFailed(f"Set {SETTING[X509]} or {SETTING[PSK]}, not both")
    if settings.transfer_tls_dir:
        return TransferCreds(X509, settings.transfer_tls_dir)
    if settings.transfer_psk_dir:
        return TransferCreds(PSK, settings.transfer_psk_dir)
    return None


def kind_of(creds: TransferCreds | None) -> str:
    """What a host announces of its credentials (never the directory): "" for none."""
    return "" if creds is None else creds.kind


def check_peer(creds: TransferCreds | None, peer_kind: str, *, here: str, peer: str) -> None:
    """Refuse a transfer with ``peer``, which announced ``peer_kind`` through Redis,
    unless both hosts use the same kind of credentials.  The announcement never talks
    this host out of TLS: with credentials, its own end speaks only TLS anyway."""
    mine = kind_of(creds)
    if mine == peer_kind:
        return
    if not peer_kind:
        raise OperationFailed(f"Host {peer} transfers unencrypted and host {here} "
                              f"requires TLS ({SETTING[mine]})", hresults.ACCESS_DENIED)
    if not mine:
        raise OperationFailed(f"Host {peer} transfers over TLS ({SETTING[peer_kind]}) and "
                              f"host {here} has neither {SETTING[X509]} nor {SETTING[PSK]}",
                              hresults.ACCESS_DENIED)
    raise OperationFailed(f"Host {peer} transfers over TLS with {SETTING[peer_kind]} and "
                          f"host {here} with {SETTING[mine]}: set the same on both",
                          hresults.ACCESS_DENIED)
