"""`server.verify_backup`: prove a restore point boots, as a task.

The backup is restored (as `workers.tasks.backup_restore` does) into a scratch VM
``verify-<random>`` that has no record in Redis and no network, booted with the
backed-up VM's configuration; the task waits until its guest agent answers (a VM
without an agent: until it has run `NO_AGENT_SECONDS`), takes a screenshot, turns it
off and removes its folder.  A clone journal marks the folder while it exists: a
worker killed meanwhile stops the scratch VM's QEMU and removes its folder at its
next start (`stop_unfinished_verifications`).
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import shutil
import time
from contextlib import ExitStack
from typing import Any

import redis

from api.protocol import keys, tasks
from api.settings import Settings
from api.vmargs import new_mac
from workers.engines import qemu_vm
from workers.engines.backups import repository as repo
from workers.engines.context import raise_if_cancelled, scaled
from workers.engines.files import HostFiles
from workers.engines.guest_agent import GuestAgentClient
from workers.failures import OperationFailed
from workers.runtime import TaskRun, operation
from workers.tasks.backup_restore import restore_disks
from workers.tasks.backups import CONFIG_FIELDS, repository_folder, waiting
from workers.tasks.clones import JOURNAL
from workers.tasks.vms import agent_socket, config_of, open_vm_files, paths_of

log = logging.getLogger(__name__)

SCRATCH_PREFIX = "verify-"
NO_AGENT_SECONDS = 10.0
AGENT_TIMEOUT = 180.0


@operation(tasks.BACKUP_VERIFY)
def verify_backup(run: TaskRun, repository: str, backup_id: str) -> dict[str, Any]:
    folder = repository_folder(run.settings, repository)
    scratch = f"{SCRATCH_PREFIX}{secrets.token_hex(4)}"
    paths = paths_of(run.settings, scratch)
    files = HostFiles.of(run.settings)
    with repo.locked(folder, exclusive=False, pause=waiting(run, folder)):
        entry = repo.load(folder).require(backup_id)
        config: dict[str, str] = json.loads(
            (repo.backup_folder(folder, backup_id) / repo.CONFIG).read_text())
        target = paths.directory / "disks"
        target.mkdir(parents=True)
        (paths.directory / JOURNAL).write_text(json.dumps({"task": run.task_id,
                                                           "source": f"verify {backup_id}"}))
        try:
            disks = restore_disks(run, folder, entry, target, (0, 60))
            run.log(f"restored backup {backup_id} into the scratch VM {scratch}")
            record = {key: config[key] for key in CONFIG_FIELDS if key in config}
            record.update({"name": scratch, "network": "", "undoable": "0",
                           "port_forwards": "[]", "mac": new_mac(),
                           "disks": json.dumps([files.relative(d) for d in disks])})
            return _boot(run, record, paths, backup_id, entry.vm)
        finally:
            shutil.rmtree(paths.directory, ignore_errors=True)


def _boot(run: TaskRun, record: dict[str, str], paths: qemu_vm.VMPaths, backup_id: str,
          vm: str) -> dict[str, Any]:
    with ExitStack() as stack:
        opened = open_vm_files(run, record, paths, stack)
        qemu_vm.start(config_of(run.settings, record), paths, scaled(run, 60, 70),
                      opened=opened)
    try:
        started = time.monotonic()
        agent = record.get("guest_agent") == "1"
        answered = False
        limit = AGENT_TIMEOUT if agent else NO_AGENT_SECONDS
        while (ran := time.monotonic() - started) < limit:
            raise_if_cancelled(run)
            if not qemu_vm.is_alive(paths):
                raise OperationFailed(f"The restored VM stopped after {ran:.1f} s")
            if agent:
                try:
                    with GuestAgentClient(agent_socket(paths)) as client:
                        answered = client.ping(timeout=2)
                except OperationFailed:
                    answered = False
                if answered:
                    break
            run.report_progress(70 + 25 * ran / limit)
            run.sleep(0.5)
        if agent and not answered:
            raise OperationFailed(f"The restored VM's guest agent did not answer within "
                                  f"{AGENT_TIMEOUT:g} s")
        png = qemu_vm.screendump(paths)
        ran = time.monotonic() - started
        run.log(f"the scratch VM ran {ran:.1f} s; guest agent answered: {answered}")
    finally:
        qemu_vm.turn_off(paths)
    run.report_progress(100)
    return {"backup": backup_id, "vm": vm, "guest_agent": answered, "ran_s": round(ran, 1),
            "screenshot_png_base64": base64.b64encode(png).decode("ascii")}


def stop_unfinished_verifications(client: redis.Redis, settings: Settings) -> None:
    """At a worker's start (nothing runs yet): a scratch VM whose verify died with its
    worker may still run (QEMU daemonizes): stop it, then remove its folder."""
    vms = HostFiles.of(settings).root / "vms"
    if not vms.is_dir():
        return
    for journal in vms.glob(f"{SCRATCH_PREFIX}*/{JOURNAL}"):
        directory = journal.parent
        if client.exists(keys.vm_record(directory.name)):
            continue  # a VM of that name, not a scratch one
        log.warning("Removing the scratch VM %s of an unfinished verify", directory.name)
        qemu_vm.turn_off(qemu_vm.VMPaths(directory))
        shutil.rmtree(directory, ignore_errors=True)
