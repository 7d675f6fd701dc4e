"""The VM state machine: which operation is legal in which VMVMState, and the
atomic compare-and-set that moves a VM between states and records the event.

    TurnedOff --startup--> TurningOn --> Running
    Saved     --startup--> Restoring --> Running      (bad state file: stays Saved)
    Running   --save-----> Saving ----> Saved
    Running   --pause----> Paused --resume--> Running
    Running|Paused --turn_off / guest shutdown--> TurningOff --> TurnedOff
    TurnedOff --merge_undo_disks--> MergingDrives --> TurnedOff
    TurnedOff|Saved --delete--> DeleteMachine --> (gone)
    Invalid --turn_off--> TurningOff --> TurnedOff;  Invalid --delete--> (gone)

Producers check `ALLOWED` before queueing (InvalidStateError at once); the worker
re-checks with `lua/vm_transition.lua` under the VM's lock, so a race between two
producers cannot slip an illegal transition through.  Its keys are the VM tasks'
`TaskSpec.vm_operation` names and the producer's own `PRODUCER_ONLY` ones; any
other key, or a VM task without one, fails the import.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from api.enums import VMVMState as S
from api.protocol import tasks, vm

ALLOWED: dict[str, frozenset[S]] = {
    "startup": frozenset({S.TurnedOff, S.Saved}),
    "save": frozenset({S.Running, S.Paused}),
    "pause": frozenset({S.Running}),
    "resume": frozenset({S.Paused}),
    "reset": frozenset({S.Running, S.Paused}),
    # Turning off a saved VM discards its saved state; an Invalid one (crashed, or
    # unreachable over QMP) is killed and cleaned up: the way out of Invalid.
    "turn_off": frozenset({S.Running, S.Paused, S.Saved, S.Invalid}),
    "guest_shutdown": frozenset({S.Running}),
    "guest_restart": frozenset({S.Running}),
    "guest_logoff": frozenset({S.Running}),
    "merge_undo_disks": frozenset({S.TurnedOff}),
    "discard_undo_disks": frozenset({S.TurnedOff}),
    "delete": frozenset({S.TurnedOff, S.Saved, S.Invalid}),
    # A saved state is bound to the configuration: changing it needs a turn_off first.
    "configure": frozenset({S.TurnedOff}),
    # Cold for TurnedOff and Saved, live for Running and Paused.
    "migrate": frozenset({S.TurnedOff, S.Saved, S.Running, S.Paused}),
    "screenshot": frozenset({S.Running, S.Paused}),
    "console_log": frozenset(S),
    "guest_info": frozenset({S.Running}),
    # Snapshots and clones from any stable state (live for Running and Paused).
    "create_snapshot": frozenset({S.TurnedOff, S.Saved, S.Running, S.Paused}),
    "revert_to_snapshot": frozenset({S.TurnedOff, S.Saved, S.Running, S.Paused}),
    "delete_snapshot": frozenset({S.TurnedOff, S.Saved, S.Running, S.Paused}),
    "clone": frozenset({S.TurnedOff, S.Saved, S.Running, S.Paused}),
    # The source half of a clone onto another host (it refuses a running present).
    "clone_out": frozenset({S.TurnedOff, S.Saved, S.Running, S.Paused}),
    # hd.resize of a running VM's disk (a TurnedOff VM's is a plain disk resize).
    "resize_disk": frozenset({S.Running, S.Paused}),
    # Running and Paused: QEMU's backup job reads a point-in-time view meanwhile.
    "backup": frozenset({S.TurnedOff, S.Saved, S.Running, S.Paused}),
}

# Checked by the producer, but no one task: configure is a script the producer runs,
# a migrate two peer tasks (``vmtask.migrate.*``).
PRODUCER_ONLY = frozenset({"configure", "migrate"})


def check_operations(allowed: Mapping[str, frozenset[S]],
                     operations: Mapping[str, tasks.TaskSpec]) -> None:
    """`TypeError` when a VM task has no entry in ``allowed`` or an entry names no
    operation: a misspelt name fails at import, not at its first call."""
    missing = set(operations) - set(allowed)
    unknown = set(allowed) - set(operations) - PRODUCER_ONLY
    if missing or unknown:
        raise TypeError(f"vmstate.ALLOWED lacks the VM tasks {sorted(missing)} and names "
                        f"no such operations as {sorted(unknown)}")


check_operations(ALLOWED, tasks.VM_OPERATIONS)

EVENTS_MAXLEN = 10_000

# The fields a worker writes while the VM runs (cleared when it stops).
RUNTIME_FIELDS = vm.RUNTIME
LIVE_STATES = frozenset({S.Running, S.Paused, S.Saving, S.TurningOff, S.Invalid})


@dataclass(frozen=True)
class VMStateEvent:
    """One state change (OnVMStateChange); ``new`` is None once the VM is deleted."""

    id: str
    name: str
    host: str
    old: S
    new: S | None
    time: float

    @classmethod
    def from_stream(cls, entry_id: str, fields: dict[str, str]) -> VMStateEvent:
        return cls(
            id=entry_id,
            name=fields["name"],
            host=fields.get("host", ""),
            old=S(int(fields["old"])),
            new=S(int(fields["new"])) if fields.get("new") else None,
            time=float(fields["time"]),
        )


def allowed_csv(states: frozenset[S]) -> str:
    return ",".join(str(int(s)) for s in sorted(states))
