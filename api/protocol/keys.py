"""Every Redis key and channel vmtask uses, in one place.

All keys start with ``vmtask:`` so a shared Redis can be inspected (or cleaned) by
prefix.  Celery's own keys (queues ``host.<name>``, ``celery-task-meta-*``, events)
live beside these and are named by Celery.
"""

from __future__ import annotations

PREFIX = "vmtask:"


def task_record(task_id: str) -> str:
    """Hash: the task record, written when the task is enqueued."""
    return f"{PREFIX}task:{task_id}"


def task_lease(task_id: str) -> str:
    """String with a TTL: present while a live worker runs the task."""
    return f"{PREFIX}lease:{task_id}"


def task_channel(task_id: str) -> str:
    """Pub/sub channel: ``progress``, ``cancel`` and ``done`` messages of one task."""
    return f"{PREFIX}events:{task_id}"


def task_log(task_id: str) -> str:
    """List: the task's log (`api.protocol.tasklog`), capped, expiring with the
    record.  `lua/task_log.lua` derives it from the record's key, so keep both."""
    return f"{PREFIX}log:{task_id}"


RUNNING_TASKS = f"{PREFIX}running"  # set of started, unfinished task ids
# Sorted set: each started, unfinished task id scored by when its lease runs out
# (Redis TIME, ms), kept by the scripts that start, renew and finish tasks.  A
# reaper reads only its due end (`lua/lease_due.lua`): judging orphans costs the
# tasks that are due, not every running task in the fleet.
LEASE_DEADLINES = f"{PREFIX}lease-deadlines"
# Strings with a TTL: which worker holds a fleet-wide duty for one period
# (`workers.host`: the slow lost-message sweep, trimming the recent-task index).
DUTY_PREFIX = f"{PREFIX}duty:"
RECENT_TASKS = f"{PREFIX}recent"  # sorted set: task id by enqueue time
# Hash: counters and histogram buckets of ended tasks, kept by `lua/task_metrics.lua`
# (which names it too) and read whole by the exporter (`api.exporter`).
METRICS = f"{PREFIX}metrics"
# Hash: the replication id of the primary crash judges last saw, and since when
# (Redis TIME): a new primary restarts the crash bound (`lua/task_finish.lua`).
REDIS_PRIMARY = f"{PREFIX}redis-primary"


def host_heartbeat(host: str) -> str:
    """String with a TTL: present while a worker serves the host."""
    return f"{PREFIX}host:{host}"


KNOWN_HOSTS = f"{PREFIX}hosts"  # set of every host name that ever advertised
# Hash: host name -> JSON {"since": epoch} for each host in maintenance; no TTL,
# so the mode outlives workers (and, with AOF, Redis) until it is switched off.
MAINTENANCE = f"{PREFIX}maintenance"


def host_queue(host: str) -> str:
    """The Celery queue of a host's long operations."""
    return f"host.{host}"


def resend_claim(host: str, takeover: str) -> str:
    """Held by the one worker of ``host`` that checks for lost messages after a
    change of Redis primary (`workers.resend`)."""
    return f"{PREFIX}resend:{host}:{takeover}"


def control_queue(host: str) -> str:
    """The Celery queue of a host's quick operations: its own lane, never behind a copy."""
    return f"host.{host}.control"


HOST_RUNNING_PREFIX = f"{PREFIX}host-running:"


def host_running(host: str) -> str:
    """Set: the started, unfinished tasks of one host, kept by the start and finish
    scripts, so a host counts its own running tasks without reading the fleet's."""
    return f"{HOST_RUNNING_PREFIX}{host}"


HOST_PENDING_PREFIX = f"{PREFIX}host-pending:"


def host_pending(host: str) -> str:
    """Sorted set: the host's PENDING tasks by submit time, kept by the scripts that
    submit, start, cancel and withdraw tasks.  The lost-message check reads its old
    end (`workers.resend`): the host's PENDING tasks past a grace, nothing else."""
    return f"{HOST_PENDING_PREFIX}{host}"


HOST_VMS_PREFIX = f"{PREFIX}host-vms:"


def host_vms(host: str) -> str:
    """Set: the names of the VMs one host owns, kept by the scripts that create, move
    and delete VM records, so a host's VM watch reads only its own records."""
    return f"{HOST_VMS_PREFIX}{host}"


def host_workers(host: str) -> str:
    """Sorted set: each live worker of the host, scored by when its presence expires."""
    return f"{PREFIX}host-workers:{host}"


def vm_record(name: str) -> str:
    """Hash: a VM's configuration, owning host and authoritative VMVMState."""
    return f"{PREFIX}vm:{name}"


VM_NAMES = f"{PREFIX}vms"  # set of every VM name (names are unique across hosts)
VM_EVENTS = f"{PREFIX}vm-events"  # stream: one entry per VMVMState change


def transfer(transfer_id: str) -> str:
    """Hash with a TTL: what the two hosts of one transfer tell each other (an
    export's offer, a move's manifest and signals); its fields are `api.protocol.transfer`."""
    return f"{PREFIX}transfer:{transfer_id}"


def transfer_accepted(transfer_id: str) -> str:
    """String with a TTL: the destination of one copy has checked it can take it (no
    clash, its lock held); only then does the source export anything."""
    return f"{PREFIX}transfer-accepted:{transfer_id}"
