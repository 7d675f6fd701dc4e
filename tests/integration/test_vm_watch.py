"""The host's VM watch reads its VMs once per beat, so its view may be half a second
old.  A VM that moved away in that time (a live migration's source) is not the
watch's to change: seen on the full suite, the source's watch turned the destination's
running guest TurnedOff and recreated the VM's folder on the source."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import redis

from api.enums import VMVMState as S
from api.protocol import keys
from api.settings import Settings
from workers.devtools.sandbox import RedisServer
from workers.tasks import vms


def test_a_stale_view_of_a_vm_that_moved_away_changes_nothing(
        redis_server: RedisServer, tmp_path: Path) -> None:
    name = f"watch-{uuid.uuid4().hex[:8]}"
    here = Settings(redis_url=redis_server.url, host=f"gone-{name}", storage_root=tmp_path)
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        # The record says the guest now runs on the destination ...
        client.hset(keys.vm_record(name), mapping={"name": name, "host": "destination",
                                                   "state": int(S.Running)})
        # ... while this host's view, read a moment before the switch, still has it.
        vms._beat_read[here.host] = (time.monotonic(),
                                     [{"name": name, "host": here.host,
                                       "state": str(int(S.Running))}])
        vms.watch_vms(client, here)
        assert client.hget(keys.vm_record(name), "state") == str(int(S.Running))
        assert not (tmp_path / "vms" / name).exists()

        # With the folder still here (the source's QEMU gone, the move done), the
        # record naming another host still wins.
        (tmp_path / "vms" / name).mkdir(parents=True)
        vms.watch_vms(client, here)
        assert client.hget(keys.vm_record(name), "state") == str(int(S.Running))
    finally:
        vms._beat_read.pop(here.host, None)
        client.delete(keys.vm_record(name))
        client.close()
