"""What both sides know of backups: repository names, backup ids, where listings live.

The worker of a repository's host mirrors each repository's index into Redis after
every change (``vmtask:host:<host>:backups``, a hash: repository path -> JSON list of
`api.backups.Backup` fields, oldest first), so `VirtualServer.backups` is a read,
not a task.  The folder's ``index.json`` is the authority
(`workers.engines.backups.repository`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from api.protocol import keys

BACKUP_ID = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{6}$")
# A VM's last successful backup (epoch s), in its record: the exporter's
# vmtask_backup_last_success_timestamp.
LAST_BACKUP_FIELD = "last_backup"


def listing_key(host: str) -> str:
    """Hash of one host's repositories (readable by producers, as ``vmtask:host:*``)."""
    return f"{keys.PREFIX}host:{host}:backups"


def listing(client: Any, host: str, repository: str) -> list[dict[str, Any]]:
    text = client.hget(listing_key(host), repository)
    if not text:
        return []
    data: list[dict[str, Any]] = json.loads(text)
    return data
