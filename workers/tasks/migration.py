"""Cold migration of a TurnedOff or Saved VM to another host: two tasks, as for a disk
copy.

The source task (`migrate_out`) holds the VM's lock for the whole migration, so no
other operation can touch the VM there, and serves each of its files in turn over
NBD, byte for byte (`workers.tasks.transfer`): each disk with its parents, the undo
overlays and the saved state.  The destination task (`migrate_in`, the one the
producer follows) refuses a clash or too little space before anything moves,
pulls every file to the same relative path in its root (each all or nothing; on
failure or cancel it removes what it pulled), rewrites a saved state's fingerprint
for the paths of its root, then moves the VM's record to this host (the move: a
compare-and-set, `vm_move.lua`): only if the record still names the source host
and the VM is still TurnedOff or Saved.  The source removes its copies only once
the record names the destination: the record decides who owns the VM, whatever
either task's fate.  The destination's task ends only after the source's task has
(a migration is complete when the source let go): a file the source could not
remove is named in its output, and the migration still ends Success, since the
move happened.
Parents of the VM's disks are copied but stay on the source (other disks may share
them).  A VM with snapshots carries its whole tree (`workers.tasks.tree_moves`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import redis

from api.enums import VMTaskResult
from api.enums import VMVMState as S
from api.errors import InvalidStateError
from api.protocol import hresults, keys, tasks
from api.protocol import transfer as xfer
from api.protocol.records import Field
from api.protocol.vmstate import EVENTS_MAXLEN, allowed_csv
from api.scripts import Scripts
from workers.engines import nbd, transfer_tls
from workers.engines.beneath import open_beneath, proc_path
from workers.engines.context import scaled
from workers.engines.files import HostFiles
from workers.engines.qemu_vm.config import config_fingerprint
from workers.engines.storage import free_space
from workers.failures import DiskError, IllegalValue
from workers.runtime import TaskRun, operation
from workers.tasks import migration_journal, tree_moves
from workers.tasks.transfer import (
    PeerWatch,
    offer_fields,
    publish,
    pull_and_judge,
)
from workers.tasks.vms import (
    config_of,
    overlays_of,
    paths_of,
    record_of,
    vm_lock,
)

MOVABLE = frozenset({S.TurnedOff, S.Saved})
WATCH = 0.1


def offer_key(transfer_id: str, index: int) -> str:
    return keys.transfer(f"{transfer_id}.{index}")


def _files_of(run: TaskRun, record: dict[str, str], state: S) -> tuple[list[Path], list[Path]]:
    """(every file to copy, the ones the VM owns and that leave the source)."""
    files = HostFiles.of(run.settings)
    paths = paths_of(files.settings, record["name"])
    copy: list[Path] = []
    owned: list[Path] = []
    for disk in json.loads(record["disks"]):
        chain = files.chain_of(files.resolve(disk, must_exist=True))
        owned.append(chain[0])
        copy.extend(p for p in reversed(chain) if p not in copy)  # parents first
    if record.get("undoable") == "1":
        for overlay in overlays_of(files.settings, record, paths):
            if overlay.exists():
                copy.append(overlay)
                owned.append(overlay)
    if state is S.Saved:
        copy += [paths.state_file, paths.fingerprint_file]
        owned += [paths.state_file, paths.fingerprint_file]
    tree = tree_moves.tree_files(run, record["name"])
    return copy + tree, owned + tree


@operation(tasks.VM_MIGRATE_OUT)
def migrate_out(run: TaskRun, name: str, destination_host: str, transfer_id: str,
                client_task_id: str) -> dict[str, Any]:
    files = HostFiles.of(run.settings)
    client = run.redis
    with vm_lock(run, name):
        record = record_of(client, run.settings, name)
        tree_moves.refuse_clone_links(run, record)
        state = S(int(record["state"]))
        if state not in MOVABLE:
            raise InvalidStateError(f"VM {name!r} is {state.name}: only a TurnedOff or Saved VM "
                                    "moves cold")
        copy, owned = _files_of(run, record, state)
        manifest = [{"path": files.relative(p), "size": os.stat(p).st_size,
                     "allocated": os.stat(p).st_blocks * 512} for p in copy]
        publish(run, keys.transfer(transfer_id), {xfer.MANIFEST: json.dumps(manifest)},
                "announcing the migration")

        client_over = PeerWatch.of(run, client_task_id, destination_host).over

        try:
            for index, path in enumerate(copy):
                with ExitStack() as stack:
                    fd = open_beneath(files.root, path)
                    stack.callback(os.close, fd)
                    export = stack.enter_context(nbd.serve(
                        nbd.file_spec(proc_path(fd)), address=run.settings.advertise_address,
                        ports=run.settings.transfer_ports, name=nbd.new_export_name(),
                        pass_fds=(fd,), creds=transfer_tls.creds_of(run.settings)))
                    key = offer_key(transfer_id, index)
                    stack.callback(run.ride_out, partial(client.delete, key),
                                   "withdrawing an export")
                    publish(run, key, {**offer_fields(export),
                                       xfer.VIRTUAL_SIZE: manifest[index]["size"],
                                       xfer.ALLOCATED: manifest[index]["allocated"],
                                       xfer.FIXED: 0}, "announcing an export")
                    while run.ride_out(
                            partial(client.hget, keys.transfer(transfer_id),
                                    xfer.done(index)),
                            "waiting for the destination's pull") != "1":
                        if client_over():
                            break
                        run.sleep(WATCH)
            # The destination's task waits for this one once the record names it
            # (a migration is complete only when the source has let go), so this one
            # must not wait for it to end.
            while not client_over() and not run.ride_out(
                    partial(_names, client, name, destination_host), "reading the VM's record"):
                run.sleep(WATCH)
        finally:
            run.ride_out(lambda: client.delete(keys.transfer(transfer_id)),
                         "removing the migration's hash")
        moved = run.ride_out(lambda: _names(client, name, destination_host),
                             "reading the VM's record")
        left = (_remove_owned(files, owned, paths_of(run.settings, name).directory)
                if moved else [])
    # ``left_on_source``: what could not be removed; the destination's task says so.
    return {"moved": moved, "left_on_source": left} if left else {"moved": moved}


def _names(client: Any, name: str, host: str) -> bool:
    """The VM's record names ``host``: the record decides who owns the VM."""
    return bool(client.hget(keys.vm_record(name), "host") == host)


def _remove_owned(files: HostFiles, owned: list[Path], directory: Path) -> list[str]:
    """Remove the VM's own files and folder from this host; what could not be removed
    (relative paths, with the reason)."""
    left: list[str] = []

    def failed(_function: Any, path: str, exc_info: Any) -> None:
        exc = exc_info[1]
        if not isinstance(exc, FileNotFoundError):
            left.append(f"{files.relative(Path(path))}: {exc.strerror or exc}")

    for path in owned:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            left.append(f"{files.relative(path)}: {exc.strerror or exc}")
    if directory.exists():
        shutil.rmtree(directory, onerror=failed)
    return left


def move_record(run: TaskRun, name: str, source_host: str, allowed: frozenset[S],
                transfer_key: str | None = None) -> str:
    """``vm_move.lua``'s outcome (to this host), sent again across a Redis outage.

    A MOVED whose record names this host is this task's own move, its reply lost
    with the connection: the record named the source when the task began, and the
    task holds the VM's lock here, so nobody else moved it here meanwhile.
    """
    record, here = keys.vm_record(name), run.settings.host

    def move() -> str:
        outcome = str(Scripts.of(run.redis).vm_move(
            record=record, events=keys.VM_EVENTS, transfer=transfer_key,
            source=source_host, destination=here, allowed=allowed_csv(allowed),
            now=repr(time.time()), max_events=EVENTS_MAXLEN,
            host_vms_prefix=keys.HOST_VMS_PREFIX))
        if outcome == "MOVED" and run.redis.hget(record, "host") == here:
            return "OK"
        return outcome

    return run.ride_out(move, f"moving the record of VM {name}")


def wait_manifest(run: TaskRun, transfer_id: str, server: PeerWatch,
                  operation: str = "migration") -> list[dict[str, Any]]:
    """The source's manifest of the files it serves, once it is published; the source
    ending first ends this too (`PeerWatch.check`)."""
    while True:
        raw = run.ride_out(lambda: run.redis.hget(keys.transfer(transfer_id), xfer.MANIFEST),
                           "waiting for the source's manifest")
        if raw:
            manifest: list[dict[str, Any]] = json.loads(raw)
            return manifest
        server.check("source", gave_up=f"stopped the {operation}")
        run.sleep(WATCH)


def _refingerprint(run: TaskRun, record: dict[str, str]) -> None:
    """A saved state is bound to its configuration, whose disk paths name this root now."""
    paths = paths_of(run.settings, record["name"])
    metadata = json.loads(paths.fingerprint_file.read_text())
    config = config_of(run.settings, record)
    metadata["fingerprint"] = config_fingerprint(config)
    metadata["config"] = config.to_dict()
    temp = paths.fingerprint_file.with_name(paths.fingerprint_file.name + ".tmp")
    temp.write_text(json.dumps(metadata, indent=2))
    os.replace(temp, paths.fingerprint_file)


@operation(tasks.VM_MIGRATE_IN)
def migrate_in(run: TaskRun, name: str, source_host: str, transfer_id: str,
               server_task_id: str) -> dict[str, Any]:
    files = HostFiles.of(run.settings)
    client = run.redis
    record: dict[str, str] = run.ride_out(lambda: client.hgetall(keys.vm_record(name)),
                                          "reading the VM's record")
    if not record or record.get("host") != source_host:
        raise IllegalValue(f"VM {name!r} is not on host {source_host}")
    vm_dir = paths_of(run.settings, name).directory
    if vm_dir.exists():
        raise DiskError(f"{files.relative(vm_dir)} already exists on {run.settings.host}",
                        hresults.FILE_EXISTS)
    pulled: list[Path] = []
    server = PeerWatch.of(run, server_task_id, source_host)
    try:
        with vm_lock(run, name):
            manifest = wait_manifest(run, transfer_id, server)
            targets = [files.resolve_output(item["path"]) for item in manifest]
            clash = [item["path"] for item, t in zip(manifest, targets, strict=True)
                     if os.path.lexists(t)]
            if clash:
                raise DiskError(f"Already on {run.settings.host}: {', '.join(clash)}",
                                hresults.FILE_EXISTS)
            needed = sum(int(item["allocated"]) for item in manifest)
            if free_space(files.root) < needed:
                raise DiskError(f"Host {run.settings.host} has too little space for VM "
                                f"{name!r} ({needed} bytes)", hresults.DISK_FULL)
            # A kill -9 from here on leaves whole files no temporary sweep removes.
            journal = migration_journal.write(run.settings, name, run.task_id,
                                         [str(item["path"]) for item in manifest])
            total = max(1, sum(int(item["size"]) for item in manifest))
            done = 0
            for index, (item, target) in enumerate(zip(manifest, targets, strict=True)):
                while not (offer := run.ride_out(
                        partial(client.hgetall, offer_key(transfer_id, index)),
                        "waiting for the source's export")):
                    server.check("source", gave_up="stopped the migration")
                    run.sleep(WATCH)
                share = scaled(run, 100.0 * done / total,
                               100.0 * (done + int(item["size"])) / total)
                pull_and_judge(run, share, offer, target, verbatim=True,
                               source_host=source_host, server_task_id=server_task_id)
                pulled.append(target)
                done += int(item["size"])
                run.ride_out(partial(client.hset, keys.transfer(transfer_id), xfer.done(index),
                                     "1"),
                             "telling the source a file arrived")
            snapshots = tree_moves.arrived(run, name)
            if S(int(record["state"])) is S.Saved:
                _refingerprint(run, record)
            outcome = move_record(run, name, source_host, MOVABLE)
            if outcome != "OK":
                raise InvalidStateError(f"VM {name!r} changed during the migration ({outcome})")
            journal.unlink()
    except BaseException:
        for path in pulled:
            path.unlink(missing_ok=True)
        shutil.rmtree(vm_dir, ignore_errors=True)
        raise
    # The VM is here now, whatever follows: nothing below may undo the move or fail the
    # migration.
    tree = {"snapshots": snapshots} if snapshots else {}
    return {"host": run.settings.host, "files": len(pulled), **tree,
            **_source_let_go(run, server, server_task_id, source_host)}


def _source_let_go(run: TaskRun, server: PeerWatch, server_task_id: str,
                   source_host: str) -> dict[str, Any]:
    """Wait until the source task has removed the VM's files (it does so once the
    record names this host, then ends), as a live migration's task ends only once
    its source let go.  Returns nothing when it did; else a ``warning`` (and
    ``left_on_source``, what it could not remove) for the task's output: the move
    happened, so the result stays Success (docs/guide/migration.md).  Not cancelable:
    the move is done."""
    unreadable_since: float | None = None
    while True:
        try:
            peer, dead = server.read()
            output = (run.redis.hget(keys.task_record(server_task_id), Field.OUTPUT)
                      if peer.final else None)
            unreadable_since = None
        except (redis.ConnectionError, redis.TimeoutError):
            # A missing reading, not an answer; a Redis that stays away ends the wait.
            now = time.monotonic()
            unreadable_since = unreadable_since or now
            if now - unreadable_since > run.settings.transfer_stall_seconds:
                return {"warning": f"Could not learn whether the source host {source_host} "
                                   "removed the VM's files (Redis unreachable)"}
            time.sleep(WATCH)
            continue
        if peer.final:
            done = json.loads(output) if output else {}
            if peer.result is VMTaskResult.Success and done.get("moved"):
                left = [str(p) for p in done.get("left_on_source", [])]
                if not left:
                    return {}
                return {"left_on_source": left,
                        "warning": f"The source host {source_host} could not remove "
                                   f"{len(left)} of the VM's files: {'; '.join(left)}"}
            return {"warning": f"The source task on {source_host} ended "
                               f"{peer.result.name if peer.result else peer.state} without "
                               f"removing the VM's files: {peer.description}"}
        if dead:
            return {"warning": f"The worker of the source host {source_host} stopped before "
                               "removing the VM's files; they may be left there"}
        time.sleep(WATCH)

