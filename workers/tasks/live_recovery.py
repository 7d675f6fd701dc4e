"""What a worker starting up does about live migrations its predecessor died in.

Each VM folder under ``vms/`` is judged by the registry (the VM record's host) and
by the journals a migration keeps there (`workers.tasks.migration_journal`):

- ``outgoing.json``: this host was the source.  Its transfer is fenced first with
  ``vm_move_abort.lua``, exactly as a live source gives up: the destination can
  then never take the VM over, or already has.  Still ours, the guest is taken back
  from whatever QEMU still runs or finished of the migration and the disks stay;
  the destination's, the source QEMU is killed and the disks the journal lists
  are removed with the folder.
- ``incoming.json``: this host was the destination.  The VM ours, the switch-over
  happened, so a guest still paused after it is run (if it ran on the source);
  not ours, the VM never came: its QEMU is killed, the disks it was receiving
  and its folder removed.
- neither: a VM the record places here whose QEMU holds a half-done outgoing
  migration (from before the journal) is taken back; a QEMU started
  ``-incoming`` for a VM the record does not place here is killed with its folder.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

import redis

from api.enums import VMVMState as S
from api.protocol import keys
from api.scripts import Scripts
from api.settings import Settings
from workers.engines import qemu_vm
from workers.engines.qemu_vm import livemigrate
from workers.engines.qemu_vm.process import force_stop
from workers.engines.storage import resolve_in_root
from workers.failures import OperationFailed
from workers.tasks import migration_journal
from workers.tasks.live_migration import DESTINATION, LIVE, wake_key
from workers.tasks.transfer import OFFER_TTL_SECONDS
from workers.tasks.vms import record_runtime, root

log = logging.getLogger(__name__)
Journal = dict[str, object]


def recover_migrations(client: redis.Redis, settings: Settings) -> None:
    """Start-up hook: settle every VM folder a migration left, as the module says."""
    vms = root(settings) / "vms"
    if not vms.is_dir():
        return
    for directory in sorted(vms.iterdir()):
        if not directory.is_dir():
            continue
        try:
            _recover(client, settings, directory)
        except redis.RedisError:
            raise  # every other VM would fail the same way: the hook's caller logs it
        except Exception:
            log.exception("Could not settle %s after a migration; left as it is", directory)


def _recover(client: redis.Redis, settings: Settings, directory: Path) -> None:
    name = directory.name
    record: dict[str, str] = client.hgetall(keys.vm_record(name))
    owner = record.get("host") if record else None
    paths = qemu_vm.VMPaths(directory)
    outgoing = migration_journal.read(directory, migration_journal.OUTGOING)
    incoming = migration_journal.read(directory, migration_journal.JOURNAL)
    if owner == settings.host and outgoing is not None and outgoing.get("transfer_id"):
        owner = _fence(client, settings, name, str(outgoing["transfer_id"]))
    if owner == settings.host:
        live = S(int(record["state"])) in LIVE and qemu_vm.is_alive(paths)
        running = S(int(record["state"])) is S.Running
        with contextlib.suppress(OperationFailed):
            if live and incoming is not None:
                _run_received(client, name, paths, record,
                              running=bool(incoming.get("running", running)))
            elif live and livemigrate.abandon_outgoing(paths, running=running):
                log.warning("VM %s: took the guest back from a migration whose worker "
                            "died", name)
        (directory / migration_journal.OUTGOING).unlink(missing_ok=True)
        return
    if owner is None and (outgoing is not None or not _incoming_qemu(paths)):
        # Not a migration's, or the VM is unknown (deleted, or Redis lost its data):
        # its disks are left to an operator.
        if outgoing is not None:
            log.warning("VM %s: no record; what its migration left here is kept", name)
        return
    force_stop(paths)
    for journal in (outgoing, incoming):
        files = journal.get("files") if journal is not None else None
        for relative in files if isinstance(files, list) else []:
            with contextlib.suppress(OSError, OperationFailed):
                resolve_in_root(root(settings), str(relative)).unlink(missing_ok=True)
    shutil.rmtree(directory, ignore_errors=True)
    if outgoing is not None:
        log.warning("VM %s moved to %s; removed its old copies on this host", name, owner)
    else:
        log.warning("Removed %s, left by a migration that did not finish", directory)


def _fence(client: redis.Redis, settings: Settings, name: str, transfer_id: str
           ) -> str | None:
    """The VM's owner once the destination can no longer take it over.

    The dead source may have signalled the switch-over: its destination, if alive,
    would take the VM over any moment.  The same script a live source gives up with
    decides it (one of the two wins), so a guest taken back here never runs there.
    """
    transfer = keys.transfer(transfer_id)
    wake = wake_key(transfer, DESTINATION)
    outcome = Scripts.of(client).vm_move_abort(record=keys.vm_record(name), transfer=transfer,
                                               wake=wake, source=settings.host)
    for key in (transfer, wake):
        client.expire(key, OFFER_TTL_SECONDS)  # the script may have created them afresh
    if outcome == "ABORTED":
        return settings.host
    owner = client.hget(keys.vm_record(name), "host")
    return str(owner) if owner is not None else None


def _run_received(client: redis.Redis, name: str, paths: qemu_vm.VMPaths,
                  record: dict[str, str], *, running: bool) -> None:
    """The switch-over gave this host the VM, but its worker died before the guest
    ran here: run it now, and record the QEMU that has it (`details`)."""
    if not livemigrate.finish_incoming(paths, running=running):
        return
    pid = qemu_vm.find_pid(paths)
    if pid is not None:
        record_runtime(client, name, paths, pid)
        if record.get("started"):
            client.hset(keys.vm_record(name), "started", record["started"])  # its uptime
    (paths.directory / migration_journal.JOURNAL).unlink(missing_ok=True)
    log.warning("VM %s: ran the guest received before this worker died (%s)", name,
                "running" if running else "paused")


def _incoming_qemu(paths: qemu_vm.VMPaths) -> bool:
    pid = qemu_vm.find_pid(paths)
    if pid is None:
        return False
    with contextlib.suppress(OSError):
        return b"-incoming" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return False
