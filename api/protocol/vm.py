"""The VM record: a hash, ``keys.vm_record(name)``, one per VM of the fleet.

Written whole by the producer's create (or a worker's clone) with `lua/vm_create.lua`;
its state and owning host change only by `lua/vm_transition.lua` and
`lua/vm_move.lua` (`api.protocol.vmstate` is the state machine), its configuration
by `lua/vm_configure.lua` while the VM is TurnedOff; the owning host's worker adds
and clears what a running VM has (`RUNTIME`), and its snapshot tree
(`api.protocol.snapshots`).  The Lua scripts spell the same names.
"""

from __future__ import annotations


class Field:
    """The record's fields."""

    NAME = "name"
    HOST = "host"  # the owning host: only its worker touches the VM's files
    STATE = "state"  # an `api.enums.VMVMState`, as an int
    CHANGED = "changed"  # when the state or host last changed (seconds, repr(float))
    CREATED = "created"
    # The configuration (`api.vmargs.config_fields`).
    MEMORY_MB = "memory_mb"
    CPUS = "cpus"
    DISKS = "disks"  # JSON list of paths relative to the host's storage root
    NETWORK = "network"  # "" (none), "user" or "bridge:<name>"
    PORT_FORWARDS = "port_forwards"  # JSON [[host port, guest port], ...]
    MAC = "mac"
    UNDOABLE = "undoable"  # "1" or "0"
    GUEST_AGENT = "guest_agent"  # "1" or "0"
    KERNEL = "kernel"
    INITRD = "initrd"
    APPEND = "append"
    # While the VM runs (cleared when it stops).
    PID = "pid"
    STARTED = "started"
    VNC = "vnc"
    VNC_PASSWORD = "vnc_password"  # a secret: never listed, never logged
    # Snapshots and linked clones (`api.protocol.snapshots`).
    SNAPSHOTS = "snapshots"
    LINKED_CLONE_OF = "linked_clone_of"


RUNTIME = (Field.PID, Field.STARTED, Field.VNC, Field.VNC_PASSWORD)
# What a listing of VMs reads of each record (not the console password).
LISTED = (Field.NAME, Field.HOST, Field.UNDOABLE, Field.GUEST_AGENT, Field.MEMORY_MB,
          Field.CPUS, Field.DISKS, Field.NETWORK, Field.PORT_FORWARDS)
