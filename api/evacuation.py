"""`VirtualServer.evacuate_host`, producer side: checks, maintenance, one parent task.

The parent runs on the host's control lane (`workers.tasks.evacuation`) and starts
the moves as its children (`workers.composite`).
"""

from __future__ import annotations

from collections.abc import Sequence

from api import maintenance
from api.arguments import check_int
from api.core import ServerCore
from api.errors import HostUnavailableError, InvalidArgumentError
from api.protocol import tasks
from api.settings import validate_host_name
from api.store import broker_errors
from api.task import VMTask

MAX_PARALLEL = 16


class EvacuationOperations(ServerCore):
    """Host maintenance and evacuation; mixed into `VirtualServer`."""

    def evacuate_host(self, host: str, destinations: Sequence[str] | None = None,
                      max_parallel: int = 2) -> VMTask:
        """Put ``host`` in maintenance, then move every VM off it: live when Running or
        Paused, cold when TurnedOff or Saved, at most ``max_parallel`` at a time, each
        to the least loaded of ``destinations`` (default: every other live host not
        in maintenance) by free memory, then free storage, from their heartbeats.

        One task for the whole: its percent aggregates the moves (its `children`);
        cancel stops every move not past its switch-over and starts no more; it ends
        Success only if every VM moved, else with the first failing move's result and
        HRESULT, its description naming the VM.  Output (also on failure):
        ``{"moved": {vm: host}, "failed": {vm: "0x........ text"}}``.  A VM that could
        not move stays on ``host``, reported in ``failed``.
        """
        validate_host_name(host)
        check_int("max_parallel", max_parallel, 1, MAX_PARALLEL)
        wanted: list[str] | None = None
        if destinations is not None:
            if isinstance(destinations, str):
                raise InvalidArgumentError("destinations must be a list of host names")
            wanted = [validate_host_name(name) for name in destinations]
            if host in wanted:
                raise InvalidArgumentError(f"{host} cannot be its own evacuation's destination")
            if not wanted:
                raise InvalidArgumentError("destinations must name at least one host "
                                           "(None: every other live host)")
        self.resolve_host(host)  # its worker drives the moves: it must be live
        status = self.host_status()
        with broker_errors(self.url):
            held = maintenance.in_maintenance(self.redis)
        usable = [name for name in (wanted or status) if name != host and name in status
                  and name not in held]
        if not usable:
            raise HostUnavailableError(
                f"No destination can take the VMs of {host}: "
                + ("none of " + ", ".join(wanted) + " is live and out of maintenance"
                   if wanted else "no other live host is out of maintenance"))
        self.set_maintenance(host, True)
        return self.submit(
            tasks.HOST_EVACUATE, description=f"Evacuating host {host}",
            kwargs={"host": host, "destinations": wanted, "max_parallel": max_parallel},
            host=host)
