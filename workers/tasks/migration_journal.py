"""What an incoming migration has written on the destination, for a worker killed
mid-migration.

A cold migration pulls each file whole (`workers.tasks.migration.migrate_in`); a file
published before the worker died is no temporary, so the start-up sweep of crashed
temporaries would keep it.  Before anything is pulled, the destination writes the
list of every file it will create to ``vms/<name>/incoming.json`` (the VM's folder
is new: a migration into an existing one is refused).  The journal goes once the
VM's record names this host (the move).  A worker starting up finds the journals of
migrations that died: where the record still names another host, the move never
happened, so what it pulled goes; where it names this host, the move did happen, so
only the journal goes.

A live migration's source keeps the other half: ``vms/<name>/outgoing.json`` lists
the VM's disks on this host before anything moves, and goes with the VM's folder
once those copies are removed, or once the guest is known to stay here.  What a
restarted source does with it is `workers.tasks.live_recovery`'s.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import redis

from api.protocol import keys
from api.settings import Settings
from workers.engines.files import HostFiles
from workers.failures import OperationFailed
from workers.tasks.disks import lease_live
from workers.tasks.vms import paths_of

log = logging.getLogger(__name__)
JOURNAL = "incoming.json"
OUTGOING = "outgoing.json"


def write(settings: Settings, name: str, task_id: str, files: list[str], *,
          journal: str = JOURNAL, **extra: str | bool) -> Path:
    """Create the VM's folder on this host (if new) with the journal of ``files``:
    the files to come (`JOURNAL`) or, on a live migration's source, the ones to go
    once the VM is elsewhere (`OUTGOING`).  ``extra``: what the journal's reader
    needs besides."""
    directory = paths_of(settings, name).directory
    directory.mkdir(parents=True, exist_ok=True)  # a migration into an existing one is refused
    path = directory / journal
    temp = path.with_name(journal + ".tmp")
    temp.write_text(json.dumps({**extra, "task_id": task_id, "files": files}))
    with temp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(temp, path)
    return path


def read(directory: Path, journal: str) -> dict[str, object] | None:
    """The journal ``journal`` in a VM's folder; None if there is none (or it is torn)."""
    try:
        entry = json.loads((directory / journal).read_text())
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) else None


def remove_unfinished_migrations(client: redis.Redis, settings: Settings) -> None:
    """Start-up hook: undo the migrations into this host whose worker died before the
    move."""
    files = HostFiles.of(settings)
    for journal in sorted((files.root / "vms").glob(f"*/{JOURNAL}")):
        name = journal.parent.name
        try:
            entry = json.loads(journal.read_text())
        except (OSError, ValueError):
            entry = None
        if not isinstance(entry, dict):
            log.warning("Unreadable migration journal %s: left alone", journal)
            continue
        if lease_live(client, str(entry.get("task_id"))):
            continue
        if client.hget(keys.vm_record(name), "host") == settings.host:
            journal.unlink(missing_ok=True)  # the move happened: the files are the VM's
            continue
        for relative in entry.get("files", []):
            try:
                files.resolve(str(relative)).unlink(missing_ok=True)
            except (OSError, OperationFailed) as exc:
                log.warning("Could not remove %s of an unfinished migration: %s", relative, exc)
        shutil.rmtree(journal.parent, ignore_errors=True)
        log.warning("Removed what an unfinished migration of VM %s left on this host", name)
