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
re-checks with `TRANSITION_SCRIPT` under the VM's lock, so a race between two
producers cannot slip an illegal transition through.
"""

from __future__ import annotations

from dataclasses import dataclass

from api.enums import VMVMState as S

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
}

EVENTS_MAXLEN = 10_000

# KEYS: vm record, events stream. ARGV: allowed states (comma-separated ints),
# new state, time, stream max length.  Returns {outcome, old state}.
TRANSITION_SCRIPT = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'MISSING', ''} end
local allowed = false
for s in string.gmatch(ARGV[1], '[^,]+') do
  if s == state then allowed = true end
end
if not allowed then return {'REFUSED', state} end
if state ~= ARGV[2] then
  redis.call('HSET', KEYS[1], 'state', ARGV[2], 'changed', ARGV[3])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*',
             'name', redis.call('HGET', KEYS[1], 'name'),
             'host', redis.call('HGET', KEYS[1], 'host'),
             'old', state, 'new', ARGV[2], 'time', ARGV[3])
end
return {'OK', state}
"""

# KEYS: vm record, names set, events stream. ARGV: name, time, stream max length.
DELETE_SCRIPT = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= tostring(%(deleting)d) then return state or 'MISSING' end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'name', ARGV[1],
           'host', redis.call('HGET', KEYS[1], 'host'), 'old', state, 'new', '', 'time', ARGV[2])
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return 'OK'
""" % {"deleting": S.DeleteMachine}  # noqa: UP031 - Lua braces would need escaping


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
