"""Host evacuation: the first composite task (`workers.composite`).

`VirtualServer.evacuate_host` queues this on the host's control lane (the parent
only starts, follows and cancels its children).  It puts the host in maintenance,
then moves every VM off it with the existing moves (`VirtualMachine.migrate`: live
when Running or Paused, cold when TurnedOff or Saved), at most ``max_parallel`` at
a time, each to the least loaded destination that can take it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from api.errors import HostUnavailableError, VMTaskError
from api.protocol import hresults, keys, tasks
from api.server import VirtualServer
from api.settings import Settings
from api.task import VMTask
from api.vms import VirtualMachine
from workers.composite import Composite, linked_server
from workers.engines.qemu_vm.lifecycle import available_memory_bytes
from workers.runtime import TaskRun, operation

MiB = 1024 * 1024


def memory_status(_client: Any, _settings: Settings) -> dict[str, Any]:
    """The heartbeat's free memory, by which an evacuation chooses destinations."""
    return {"memory_free_bytes": available_memory_bytes()}


class Destinations:
    """The hosts a VM may go to, least loaded first: by free memory, then free
    storage, as their heartbeats say, less what this evacuation already sent there."""

    def __init__(self, run: TaskRun, server: VirtualServer, source: str,
                 wanted: list[str] | None) -> None:
        self.run = run
        status = server.host_status()
        self.free: dict[str, list[int]] = {}
        for name in wanted if wanted else sorted(status):
            beat = status.get(name)
            if name == source:
                continue
            if beat is None:
                run.log(f"destination {name} skipped: no live worker serves it")
            elif beat.get("maintenance"):
                run.log(f"destination {name} skipped: it is in maintenance")
            else:
                self.free[name] = [int(beat.get("memory_free_bytes") or 0),
                                   int(beat.get("storage_free_bytes") or 0)]
        run.log("destinations: " + (", ".join(
            f"{n} ({m // MiB} MB memory, {s // MiB} MB storage free)"
            for n, (m, s) in self.ordered()) or "none"))

    def ordered(self) -> list[tuple[str, list[int]]]:
        return sorted(self.free.items(), key=lambda item: (-item[1][0], -item[1][1], item[0]))

    def move(self, server: VirtualServer, vm: VirtualMachine, chosen: dict[str, str]) -> VMTask:
        """Start ``vm``'s move to the first destination that takes it; each one skipped
        is logged with why.  Raises the last refusal when none takes it."""
        needed = vm.memory_mb * MiB
        refusal: VMTaskError | None = None
        for name, free in self.ordered():
            if free[0] and free[0] < needed:
                self.run.log(f"{vm.name}: destination {name} skipped: it has "
                             f"{free[0] // MiB} MB of memory free, the VM needs {vm.memory_mb} MB")
                continue
            try:
                task = vm.migrate(name)
            except VMTaskError as exc:
                self.run.log(f"{vm.name}: destination {name} skipped: {exc}")
                refusal = exc
                continue
            free[0] -= needed  # what it takes there once the heartbeat catches up
            chosen[vm.name] = name
            self.run.log(f"{vm.name}: moving to {name} ({vm.state.name}: "
                         f"{'live' if task.description.startswith('Migrating') else 'cold'})")
            return task
        if refusal is not None:
            raise refusal
        raise HostUnavailableError(f"no destination can take VM {vm.name}")


def _mover(places: Destinations, server: VirtualServer, vm: VirtualMachine,
           chosen: dict[str, str]) -> Callable[[], VMTask]:
    return lambda: places.move(server, vm, chosen)


@operation(tasks.HOST_EVACUATE)
def evacuate_host(run: TaskRun, host: str, destinations: list[str] | None,
                  max_parallel: int) -> dict[str, Any]:
    server = linked_server(run)
    try:
        server.set_maintenance(host, True)
        run.log(f"maintenance: {host} is in maintenance; nothing new is placed there")
        names = sorted(run.ride_out(lambda: run.redis.smembers(keys.host_vms(host)),
                                    "listing the host's VMs"))
        run.log(f"{len(names)} VM(s) to move, at most {max_parallel} at a time: "
                f"{', '.join(names) or 'none'}")
        places = Destinations(run, server, host, destinations)
        chosen: dict[str, str] = {}
        not_started: list[str] = []
        with Composite(run, server, len(names)) as composite:
            for index, name in enumerate(names):
                composite.wait(max_parallel)
                if composite.cancelled or run.cancel_requested():
                    composite.cancel_children()
                    not_started = names[index:]
                    break
                vm = server.find_virtual_machine(name)
                if vm is None or vm.host != host:
                    run.log(f"{name}: not on {host} any more; nothing to do")
                    composite.planned = max(1, composite.planned - 1)
                    continue
                composite.start(name, _mover(places, server, vm, chosen))
            composite.wait()
        failed = {e.label: e.text for e in composite.ended if e.result.name != "Success"}
        for name in not_started:
            failed[name] = (f"{hresults.format_hresult(hresults.E_ABORT)} not moved: the "
                            "evacuation was cancelled first")
        moved = {e.label: chosen[e.label] for e in composite.ended
                 if e.result.name == "Success" and e.label in chosen}
        return dict(composite.finish({"moved": moved, "failed": failed}))
    finally:
        server.close()

