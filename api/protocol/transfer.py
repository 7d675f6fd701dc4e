"""The transfer hash: what two hosts tell each other while a disk or a VM moves.

``keys.transfer(transfer_id)`` is a hash with a TTL that both tasks of a transfer
read and write; each field is written by one side only.  Its fields are named
here and nowhere else in Python (the architecture test keeps it so); the two Lua
scripts that read the hash spell `ABORT` themselves, and a unit test keeps them equal.

An export's offer (a disk copy's source, `workers.tasks.transfer`; one per disk
of a cold move, ``keys.transfer(f"{transfer_id}.{index}")``): `ADDRESS`, `PORT`,
`EXPORT` (a one-time NBD export name), `TLS` and `CREDS` (the kind of the source's
transfer TLS), `VIRTUAL_SIZE`, `ALLOCATED`, `FIXED`, and `HOST` (the source).
A disk copy's destination says it can take the copy with
``keys.transfer_accepted``, a key of its own.

A cold move (`workers.tasks.migration`): the source's `MANIFEST` (each disk's path
and sizes), then the destination's ``done.<index>`` (`done`) per disk pulled.

A live migration (`workers.tasks.live_migration`, `workers.tasks.live_chain`; the
order is that module's docstring), each side woken by a push on its wake list
(`wake`):

- source: `MANIFEST` (each disk's path, format, sizes), `CHAIN` (the images below
  the tops), `CREDS`; then `CHAIN_OFFERS` (exports of those images), `SWITCH`
  ("1": take over), and `ABORT` ("1", set by ``vm_move_abort.lua``, read by
  ``vm_move.lua``: the source took the guest back).
- destination: `ACCEPTED` ("1": it can take the VM, so serve the chain),
  `CHAIN_DONE` (the share of the chain pulled, "0.4200"), `INCOMING` (its QEMU
  and NBD server, JSON), `COMMITTED` ("1": the record names it, the guest runs).
"""

from __future__ import annotations

# An export's offer.
ADDRESS = "address"
PORT = "port"
EXPORT = "export"
TLS = "tls"
CREDS = "creds"
VIRTUAL_SIZE = "virtual_size"
ALLOCATED = "allocated"
FIXED = "fixed"
HOST = "host"

# A move: cold, and live.
MANIFEST = "manifest"
CHAIN = "chain"
CHAIN_OFFERS = "chain_offers"
ACCEPTED = "accepted"
CHAIN_DONE = "chain_done"
INCOMING = "incoming"
SWITCH = "switch"
ABORT = "abort"
COMMITTED = "committed"

# What a module that reads or writes a transfer hash must not spell itself (the
# architecture test); the sizes and the host are also keys of a manifest's items and
# of the VM record, so they are left out of the check, not out of this module.
FIELDS = frozenset({ADDRESS, PORT, EXPORT, TLS, CREDS, MANIFEST, CHAIN, CHAIN_OFFERS,
                    ACCEPTED, CHAIN_DONE, INCOMING, SWITCH, ABORT, COMMITTED})

# The sides of a live migration, and their wake lists.
SOURCE, DESTINATION = "source", "destination"


def done(index: int) -> str:
    """A cold move's field: the destination pulled disk ``index`` ("1")."""
    return f"done.{index}"


def wake(key: str, side: str) -> str:
    """The list ``side`` waits on (BLPOP) for the other side's next signal."""
    return f"{key}:wake:{side}"
