"""The task lease: who runs a started task, and whether that worker may still live.

``keys.task_lease(task_id)`` is a string with a TTL (the lease), renewed by the
worker that runs the task (`lua/task_renew.lua`); the record's ``worker`` field
names the same holder.  Its value is the holder, ``host:machine:pid``: the vmtask
host the worker serves, the machine it runs on (``socket.gethostname()``), and its
process id, so a restarted worker tells its own lease from another's, and a worker
on the same machine can check whether the holder's process still exists.  The host
name may itself contain ``:`` (it is a Redis key part, not a DNS name): the last
two parts are the machine and the pid.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class Holder:
    """One lease holder: a worker process."""

    host: str
    machine: str
    pid: int

    @classmethod
    def of_this_process(cls, host: str) -> Holder:
        return cls(host, socket.gethostname(), os.getpid())

    @classmethod
    def parse(cls, value: str) -> Holder:
        """The holder a lease (or a record's ``worker``) names; ValueError if malformed."""
        host, machine, pid = value.rsplit(":", 2)
        return cls(host, machine, int(pid))

    def __str__(self) -> str:
        return f"{self.host}:{self.machine}:{self.pid}"

    @property
    def on_this_machine(self) -> bool:
        """Whether its process is one this machine can look for (by its pid)."""
        return self.machine == socket.gethostname()
