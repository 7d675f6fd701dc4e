"""`VirtualMachine` (IVMVirtualMachine), `GuestOS` (IVMGuestOS) and the VM registry.

A VM's record lives in Redis (``vmtask:vm:<name>``): its configuration, its host
and its authoritative `VMVMState`.  Operations check the state at once (raising
`InvalidStateError` with nothing queued) and are routed to the VM's host.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import redis

from api.arguments import check_relative_path, check_stream_id, check_text, format_for_name
from api.core import ServerCore
from api.enums import VMVMState
from api.errors import InvalidArgumentError, InvalidStateError, NotFoundError
from api.protocol import keys, scripts, tasks
from api.protocol.vmstate import ALLOWED, VMStateEvent
from api.store import broker_errors
from api.task import VMTask, validate_timeout

VM_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
MAX_MEMORY_MB = 1024 * 1024
MAX_DISKS = 16
DEFAULT_GUEST_TIMEOUT_S = 120

CREATE_SCRIPT = scripts.load("vm_create")


class VirtualMachine:
    """A handle on one VM; its configuration is read once, its state live."""

    def __init__(self, server: ServerCore, record: Mapping[str, str]) -> None:
        self._server = server
        self.name: str = record["name"]
        self.host: str = record["host"]
        self.memory_mb = int(record["memory_mb"])
        self.disks: tuple[str, ...] = tuple(json.loads(record.get("disks", "[]")))
        self.undoable = record.get("undoable") == "1"
        self.guest_agent = record.get("guest_agent") == "1"
        self.guest_os = GuestOS(self)

    def __repr__(self) -> str:
        return f"<VirtualMachine {self.name} on {self.host}>"

    @property
    def state(self) -> VMVMState:
        """Read live.  A VM whose host has no live worker is Invalid until it returns."""
        with broker_errors(self._server.url):
            pipe = self._server.redis.pipeline(transaction=False)
            pipe.hget(keys.vm_record(self.name), "state")
            pipe.exists(keys.host_heartbeat(self.host))
            state, host_alive = pipe.execute()
        if state is None:
            raise NotFoundError(f"VM {self.name!r} no longer exists")
        return VMVMState(int(state)) if host_alive else VMVMState.Invalid

    def _operate(self, operation: str, description: str, **kwargs: Any) -> VMTask:
        state = self.state
        if state not in ALLOWED[operation]:
            allowed = ", ".join(s.name for s in sorted(ALLOWED[operation]))
            raise InvalidStateError(
                f"Cannot {operation.replace('_', ' ')} VM {self.name!r} while it is "
                f"{state.name} (allowed from: {allowed})")
        return self._server.submit(
            tasks.VM_OPERATIONS[operation], description=f"{description} {self.name}",
            kwargs={"name": self.name, **kwargs}, host=self.host)

    def startup(self) -> VMTask:
        """Boot a TurnedOff VM, or restore a Saved one."""
        return self._operate("startup", "Starting")

    def save(self) -> VMTask:
        return self._operate("save", "Saving")

    def reset(self) -> VMTask:
        return self._operate("reset", "Resetting")

    def turn_off(self) -> VMTask:
        return self._operate("turn_off", "Turning off")

    def pause(self) -> VMTask:
        return self._operate("pause", "Pausing")

    def resume(self) -> VMTask:
        return self._operate("resume", "Resuming")

    def merge_undo_disks(self) -> VMTask:
        self._require_undoable()
        return self._operate("merge_undo_disks", "Merging the undo disks of")

    def discard_undo_disks(self) -> VMTask:
        self._require_undoable()
        return self._operate("discard_undo_disks", "Discarding the undo disks of")

    def delete(self) -> VMTask:
        return self._operate("delete", "Deleting")

    def _require_undoable(self) -> None:
        if not self.undoable:
            raise InvalidArgumentError(f"VM {self.name!r} has no undo disks (not undoable)")


class GuestOS:
    """IVMGuestOS: requests to the guest, through its agent or the ACPI power button."""

    def __init__(self, vm: VirtualMachine) -> None:
        self._vm = vm

    def shutdown(self, timeout_s: int = DEFAULT_GUEST_TIMEOUT_S) -> VMTask:
        """Ask the guest to power off; TimeOutError (VM still running) if it ignores us."""
        return self._vm._operate("guest_shutdown", "Shutting down the guest of",
                                 timeout_s=_timeout(timeout_s))

    def restart(self, timeout_s: int = DEFAULT_GUEST_TIMEOUT_S) -> VMTask:
        return self._vm._operate("guest_restart", "Restarting the guest of",
                                 timeout_s=_timeout(timeout_s))

    def logoff(self, timeout_s: int = DEFAULT_GUEST_TIMEOUT_S) -> VMTask:
        return self._vm._operate("guest_logoff", "Logging off the guest of",
                                 timeout_s=_timeout(timeout_s))


def check_vm_name(name: object) -> str:
    if not isinstance(name, str) or not VM_NAME_PATTERN.fullmatch(name):
        raise InvalidArgumentError(
            f"Invalid VM name {name!r}: 1-64 letters, digits, '_', '.' or '-'")
    return name


def _timeout(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 3600:
        raise InvalidArgumentError(f"timeout_s must be an int in 1..3600, not {value!r}")
    return value


class VMOperations(ServerCore):
    """The IVMVirtualServer VM methods; mixed into `VirtualServer`."""

    def create_virtual_machine(
        self,
        name: str,
        memory_mb: int = 128,
        disks: Sequence[str] = (),
        undoable: bool = False,
        *,
        host: str | None = None,
        kernel: str | None = None,
        initrd: str | None = None,
        append: str | None = None,
        guest_agent: bool = False,
    ) -> VirtualMachine:
        """Register a VM (TurnedOff) on a host.  Paths are relative to its storage root."""
        check_vm_name(name)
        if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) \
                or not 1 <= memory_mb <= MAX_MEMORY_MB:
            raise InvalidArgumentError(f"memory_mb must be an int in 1..{MAX_MEMORY_MB}, "
                                       f"not {memory_mb!r}")
        if isinstance(disks, (str, bytes)) or not isinstance(disks, (list, tuple)):
            raise InvalidArgumentError(
                f"disks must be a list or tuple of paths, not {type(disks).__name__}")
        if len(disks) > MAX_DISKS:
            raise InvalidArgumentError(f"A VM takes at most {MAX_DISKS} disks")
        disk_list = [check_relative_path(d, "disk") for d in disks]
        for disk in disk_list:
            format_for_name(disk)
        if len(set(disk_list)) != len(disk_list):
            raise InvalidArgumentError("A disk is attached twice")
        for what, value in (("kernel", kernel), ("initrd", initrd)):
            if value is not None:
                check_relative_path(value, what)
        if append is not None:
            check_text(append, "append", allow_empty=True)
        if kernel is None and (initrd is not None or append is not None):
            raise InvalidArgumentError("initrd and append need a kernel")
        target = self.resolve_host(host)
        fields = {
            "name": name, "host": target, "state": str(int(VMVMState.TurnedOff)),
            "memory_mb": str(memory_mb), "disks": json.dumps(disk_list),
            "undoable": "1" if undoable else "0", "guest_agent": "1" if guest_agent else "0",
            "kernel": kernel or "", "initrd": initrd or "", "append": append or "",
            "created": repr(time.time()),
        }
        args = [name]
        for key, value in fields.items():
            args += [key, value]
        with broker_errors(self.url):
            created = self.redis.eval(CREATE_SCRIPT, 2, keys.vm_record(name), keys.VM_NAMES,
                                      *args)
        if not created:
            raise InvalidArgumentError(f"A VM named {name!r} already exists")
        return VirtualMachine(self, fields)

    def find_virtual_machine(self, name: str) -> VirtualMachine | None:
        check_vm_name(name)
        with broker_errors(self.url):
            record = self.redis.hgetall(keys.vm_record(name))
        return VirtualMachine(self, record) if record else None

    @property
    def virtual_machines(self) -> list[VirtualMachine]:
        with broker_errors(self.url):
            names = sorted(self.redis.smembers(keys.VM_NAMES))
            pipe = self.redis.pipeline(transaction=False)
            for name in names:
                pipe.hgetall(keys.vm_record(name))
            records = pipe.execute() if names else []
        return [VirtualMachine(self, r) for r in records if r]

    def vm_events(self, since: str = "$", *, timeout_ms: int | None = None
                  ) -> Iterator[VMStateEvent]:
        """Every VM state change from ``since`` (a stream id; "$": from now, "0": all kept).

        Blocks for new events; with ``timeout_ms`` the iteration ends after that long
        without one (0: only what is already there; -1 or None: forever).  The
        analogue of IVMVirtualServerEvents::OnVMStateChange.  Bad arguments raise
        at the call, before the first event.
        """
        check_stream_id(since)
        if timeout_ms is not None:
            validate_timeout(timeout_ms)
            if timeout_ms == -1:
                timeout_ms = None
        return self._vm_events(since, timeout_ms)

    def _vm_events(self, since: str, timeout_ms: int | None) -> Iterator[VMStateEvent]:
        last = since
        if last == "$":
            with broker_errors(self.url):
                newest = self.redis.xrevrange(keys.VM_EVENTS, count=1)
            last = newest[0][0] if newest else "0"
        # Block in slices shorter than the client's deadline: one long XREAD BLOCK
        # would be indistinguishable from a frozen Redis.
        slice_ms = max(1, int(self.timeout * 500))
        idle_since = time.monotonic()
        while True:
            block: int | None = slice_ms
            if timeout_ms is not None:
                left_ms = timeout_ms - int((time.monotonic() - idle_since) * 1000)
                block = min(slice_ms, left_ms) if left_ms > 0 else None  # None: no wait
            with broker_errors(self.url):
                try:
                    reply = self.redis.xread({keys.VM_EVENTS: last}, block=block, count=100)
                except redis.ResponseError as exc:  # an id Redis refuses after all
                    raise InvalidArgumentError(f"since={since!r}: {exc}") from None
            if reply:
                for entry_id, fields in reply[0][1]:
                    last = entry_id
                    yield VMStateEvent.from_stream(entry_id, fields)
                idle_since = time.monotonic()
            elif block is None:
                return
