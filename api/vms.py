"""`VirtualMachine` (IVMVirtualMachine) and the VM registry (`GuestOS`: `api.guest`).

A VM's record lives in Redis (``vmtask:vm:<name>``): its configuration, its host
and its authoritative `VMVMState`.  Operations check the state at once (raising
`InvalidStateError` with nothing queued) and are routed to the VM's host.
"""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import redis

from api.arguments import check_int, check_relative_path, check_stream_id, check_text
from api.backups import BackupVMMethods
from api.core import Peer, ServerCore, submit_peers
from api.enums import VMVMState
from api.errors import InvalidArgumentError, InvalidStateError, NotFoundError
from api.guest import GuestOS
from api.protocol import keys, tasks
from api.protocol import vm as vm_schema
from api.protocol.vmstate import (
    ALLOWED,
    LIVE_STATES,
    VMStateEvent,
    allowed_csv,
)
from api.replication import pipelined
from api.settings import validate_host_name
from api.snapshots import SnapshotMethods
from api.store import broker_errors
from api.task import VMTask, validate_timeout
from api.vmargs import (
    check_cpus,
    check_disks,
    check_memory,
    check_network,
    check_port_forwards,
    config_fields,
    forwards_of,
    new_mac,
    to_args,
)

VM_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
MAX_CONSOLE_TAIL = 4 * 1024 * 1024

VM_PAGE = 1000  # VM records per script call of a listing
# What a `VirtualMachine` reads of its record when it is made.
LISTED_FIELDS = vm_schema.LISTED

class VirtualMachine(SnapshotMethods, BackupVMMethods):
    """A handle on one VM; its configuration is read once, its state live."""

    def __init__(self, server: ServerCore, record: Mapping[str, str]) -> None:
        self._server = server
        self.name: str = record["name"]
        self.host: str = record["host"]
        self.undoable = record.get("undoable") == "1"
        self.guest_agent = record.get("guest_agent") == "1"
        self._load(record)
        self.guest_os = GuestOS(self)

    def _load(self, record: Mapping[str, str]) -> None:
        self.memory_mb = int(record["memory_mb"])
        self.cpus = int(record.get("cpus") or 1)
        self.network: str | None = record.get("network") or None
        # Parsed when first asked for: a listing makes thousands of these.
        self._disks_json = record.get("disks") or "[]"
        self._forwards_json = record.get("port_forwards") or "[]"

    @property
    def disks(self) -> tuple[str, ...]:
        return tuple(json.loads(self._disks_json))

    @property
    def port_forwards(self) -> dict[int, int]:
        return forwards_of({"port_forwards": self._forwards_json})

    def __repr__(self) -> str:
        return f"<VirtualMachine {self.name} on {self.host}>"

    def _read(self) -> tuple[dict[str, str], VMVMState]:
        with broker_errors(self._server.url):
            pipe = self._server.redis.pipeline(transaction=False)
            pipe.hgetall(keys.vm_record(self.name))
            pipe.exists(keys.host_heartbeat(self.host))
            record, host_alive = pipe.execute()
            if not record:
                raise NotFoundError(f"VM {self.name!r} no longer exists")
            if record["host"] != self.host:
                # Moved: its operations go to its new host, and its state is that
                # host's to vouch for, not the old one's (which may be gone).
                self.host = record["host"]
                host_alive = self._server.redis.exists(keys.host_heartbeat(self.host))
        return record, VMVMState(int(record["state"])) if host_alive else VMVMState.Invalid

    @property
    def state(self) -> VMVMState:
        """Read live.  A VM whose host has no live worker is Invalid until it returns."""
        return self._read()[1]

    def _check(self, operation: str, state: VMVMState | None = None) -> None:
        state = self.state if state is None else state
        if state not in ALLOWED[operation]:
            allowed = ", ".join(s.name for s in sorted(ALLOWED[operation]))
            raise InvalidStateError(
                f"Cannot {operation.replace('_', ' ')} VM {self.name!r} while it is "
                f"{state.name} (allowed from: {allowed})")

    def _operate(self, spec: tasks.TaskSpec, description: str, **kwargs: Any) -> VMTask:
        self._check(spec.vm_operation)
        return self._server.submit(
            spec, description=f"{description} {self.name}",
            kwargs={"name": self.name, **kwargs}, host=self.host)

    def startup(self) -> VMTask:
        """Boot a TurnedOff VM, or restore a Saved one; refused (HostUnavailableError)
        while its host is in maintenance."""
        self._server.placeable_host(self.host, f"starting VM {self.name}")
        return self._operate(tasks.VM_STARTUP, "Starting")

    def save(self) -> VMTask:
        return self._operate(tasks.VM_SAVE, "Saving")

    def reset(self) -> VMTask:
        return self._operate(tasks.VM_RESET, "Resetting")

    def turn_off(self) -> VMTask:
        return self._operate(tasks.VM_TURN_OFF, "Turning off")

    def pause(self) -> VMTask:
        return self._operate(tasks.VM_PAUSE, "Pausing")

    def resume(self) -> VMTask:
        return self._operate(tasks.VM_RESUME, "Resuming")

    def merge_undo_disks(self) -> VMTask:
        self._require_undoable()
        return self._operate(tasks.VM_MERGE_UNDO_DISKS, "Merging the undo disks of")

    def discard_undo_disks(self) -> VMTask:
        self._require_undoable()
        return self._operate(tasks.VM_DISCARD_UNDO_DISKS, "Discarding the undo disks of")

    def delete(self) -> VMTask:
        self._check(tasks.VM_DELETE.vm_operation)
        self._refuse_with_clones()
        return self._operate(tasks.VM_DELETE, "Deleting")

    def migrate(self, destination_host: str) -> VMTask:
        """Move the VM to ``destination_host``; cancelable, progress 0..100.

        TurnedOff or Saved: a cold migration.  Its disks (with their parents), undo disks
        and saved state are copied host to host over NBD, the record then names the
        new host (a fenced compare-and-set), and the source's copies of the VM's own
        files are removed.  Cancel or failure leaves the VM on its host and nothing
        on the destination.

        Running or Paused: a live migration.  Each disk is mirrored into an NBD
        export of a paused QEMU on the destination, then RAM and device state follow
        (QEMU ``migrate``); the guest pauses only at the switch-over and the state
        reads Running (or Paused) throughout.  Qcow2 and raw disks only.  A disk
        that is a chain (an undo disk over its base, a differencing disk over its
        parents) arrives as the same chain: the images below the top are copied byte
        for byte first, then only the top is mirrored.  Cancel or failure before the
        switch-over leaves the guest running on the source, unharmed, and nothing on
        the destination.  The task's output gives QEMU's ``downtime_ms`` and the
        guest's whole pause, ``paused_ms`` (downtime plus the switch-over).

        Snapshots: a move, cold or live, carries the whole tree (every layer, the
        saved states of points with memory, the tree file); live, only the present
        is mirrored, the layers below go byte for byte first.  A linked clone, and a
        VM that linked clones rest on, are refused with `InvalidStateError`.
        """
        validate_host_name(destination_host)
        record, state = self._read()
        self._refuse_with_snapshots(record, "move")
        if destination_host == self.host:
            raise InvalidArgumentError(f"VM {self.name!r} is already on {destination_host}")
        self._check("migrate", state)
        target = self._server.placeable_host(destination_host, f"moving VM {self.name} there")
        transfer_id, in_id, out_id = (str(uuid.uuid4()) for _ in range(3))
        source = self.host
        if state in (VMVMState.Running, VMVMState.Paused):
            # The source drives and the producer follows it; the destination helps.
            self._server.announce_child(out_id)
            return submit_peers(
                self._server,
                Peer(tasks.VM_LIVE_IN, f"Receiving VM {self.name} from {source}",
                     {"name": self.name, "source_host": source,
                      "transfer_id": transfer_id, "peer_task_id": out_id},
                     host=target, task_id=in_id),
                Peer(tasks.VM_LIVE_OUT,
                     f"Migrating VM {self.name} live from {source} to {target}",
                     {"name": self.name, "destination_host": target,
                      "transfer_id": transfer_id, "peer_task_id": in_id},
                     host=source, task_id=out_id))
        self._server.announce_child(in_id)
        return submit_peers(
            self._server,
            Peer(tasks.VM_MIGRATE_OUT, f"Sending VM {self.name} to {target}",
                 {"name": self.name, "destination_host": target,
                  "transfer_id": transfer_id, "client_task_id": in_id},
                 host=source, task_id=out_id),
            Peer(tasks.VM_MIGRATE_IN, f"Moving VM {self.name} from {source} to {target}",
                 {"name": self.name, "source_host": source,
                  "transfer_id": transfer_id, "server_task_id": out_id},
                 host=target, task_id=in_id))

    def _require_undoable(self) -> None:
        if not self.undoable:
            raise InvalidArgumentError(f"VM {self.name!r} has no undo disks (not undoable)")

    # -- configuration and what the VM shows ----------------------------------------

    def configure(self, memory_mb: int | None = None, cpus: int | None = None,
                  disks: Sequence[str] | None = None, network: str | None = None,
                  port_forwards: Mapping[int, int] | None = None) -> None:
        """Change what the next boot gets; only while TurnedOff (else InvalidStateError).

        None leaves a setting as it is; ``network="none"`` removes the NIC and
        ``port_forwards={}`` drops the forwards.  A Saved VM is refused: its state
        is bound to the configuration (turn it off first, which discards the state).
        """
        record, state = self._read()
        self._check("configure", state)
        new_memory = int(record["memory_mb"]) if memory_mb is None else check_memory(memory_mb)
        new_cpus = int(record.get("cpus") or 1) if cpus is None else check_cpus(cpus)
        new_disks = json.loads(record["disks"]) if disks is None else check_disks(disks)
        if disks is not None and self.undoable and new_disks != json.loads(record["disks"]):
            raise InvalidArgumentError(
                f"The disks of undoable VM {self.name!r} cannot change: its undo disks "
                "are overlays of the current ones")
        if disks is not None and record.get("snapshots") and \
                new_disks != json.loads(record["disks"]) and self.snapshots:
            raise InvalidStateError(f"The disks of VM {self.name!r} cannot change while it has "
                                    "snapshots: their layers rest on the current ones")
        new_network = (record.get("network") or None) if network is None \
            else check_network(network)
        forwards = forwards_of(record) if port_forwards is None else port_forwards
        new_forwards = check_port_forwards(forwards, new_network)
        fields = config_fields(memory_mb=new_memory, cpus=new_cpus, disks=new_disks,
                               network=new_network, forwards=new_forwards)
        with broker_errors(self._server.url):
            outcome, current = self._server.scripts.vm_configure(
                record=keys.vm_record(self.name), allowed=allowed_csv(ALLOWED["configure"]),
                fields=to_args(fields))
        if outcome == "MISSING":
            raise NotFoundError(f"VM {self.name!r} no longer exists")
        if outcome == "REFUSED":
            self._check("configure", VMVMState(int(current)))
        self._load({**record, **fields})

    @property
    def details(self) -> dict[str, Any]:
        """The VM's configuration and, while it runs, its process: one Redis read."""
        record, state = self._read()
        self._load(record)
        live = state in LIVE_STATES and bool(record.get("pid"))
        started = float(record["started"]) if live and record.get("started") else None
        return {
            "name": self.name, "state": state, "host": self.host,
            "pid": int(record["pid"]) if live else None,
            "cpus": self.cpus, "memory_mb": self.memory_mb, "disks": list(self.disks),
            "network": self.network, "port_forwards": dict(self.port_forwards),
            "mac": record.get("mac") or None,
            "uptime_s": round(time.time() - started, 1) if started is not None else None,
            "vnc": (record.get("vnc") or None) if live else None,
            "undoable": self.undoable, "guest_agent": self.guest_agent,
        }

    def console_access(self) -> dict[str, str] | None:
        """The VNC address and this start's password, or None while it has no console."""
        record, state = self._read()
        if state not in LIVE_STATES or not record.get("vnc"):
            return None
        return {"address": record["vnc"], "password": record.get("vnc_password", "")}

    def screenshot(self) -> bytes:
        """A PNG of the VM's display right now (QMP screendump); Running or Paused."""
        self._check(tasks.VM_SCREENSHOT.vm_operation)
        output = self._server.run_quick(
            tasks.VM_SCREENSHOT, description=f"Taking a screenshot of {self.name}",
            kwargs={"name": self.name}, host=self.host)
        return base64.b64decode(output["png"])

    def console_log(self, tail_bytes: int = 65536) -> str:
        """The end of the VM's serial console output, read on its host."""
        check_int("tail_bytes", tail_bytes, 1, MAX_CONSOLE_TAIL)
        output = self._server.run_quick(
            tasks.VM_CONSOLE_LOG, description=f"Reading the console log of {self.name}",
            kwargs={"name": self.name, "tail_bytes": tail_bytes}, host=self.host)
        return str(output["text"])

def check_vm_name(name: object) -> str:
    if not isinstance(name, str) or not VM_NAME_PATTERN.fullmatch(name):
        raise InvalidArgumentError(
            f"Invalid VM name {name!r}: 1-64 letters, digits, '_', '.' or '-'")
    return name


class VMOperations(ServerCore):
    """The IVMVirtualServer VM methods; mixed into `VirtualServer`."""

    def create_virtual_machine(
        self,
        name: str,
        memory_mb: int = 128,
        disks: Sequence[str] = (),
        undoable: bool = False,
        guest_agent: bool = False,
        cpus: int = 1,
        network: str | None = "user",
        port_forwards: Mapping[int, int] | None = None,
        *,
        host: str | None = None,
        kernel: str | None = None,
        initrd: str | None = None,
        append: str | None = None,
    ) -> VirtualMachine:
        """Register a VM (TurnedOff) on a host.  Paths are relative to its storage root.

        ``network``: None (no NIC), "user" (QEMU's user-mode NAT) or "bridge:NAME"
        (a tap on an existing host bridge); ``port_forwards`` maps host TCP ports
        to guest TCP ports, for "user".
        """
        check_vm_name(name)
        check_memory(memory_mb)
        check_cpus(cpus)
        disk_list = check_disks(disks)
        checked_network = check_network(network)
        forwards = check_port_forwards(port_forwards, checked_network)
        for what, value in (("kernel", kernel), ("initrd", initrd)):
            if value is not None:
                check_relative_path(value, what)
        if append is not None:
            check_text(append, "append", allow_empty=True)
        if kernel is None and (initrd is not None or append is not None):
            raise InvalidArgumentError("initrd and append need a kernel")
        target = self.placeable_host(host, f"creating VM {name}")
        field = vm_schema.Field
        fields = {
            field.NAME: name, field.HOST: target, field.STATE: str(int(VMVMState.TurnedOff)),
            **config_fields(memory_mb=memory_mb, cpus=cpus, disks=disk_list,
                            network=checked_network, forwards=forwards),
            field.MAC: new_mac(),
            field.UNDOABLE: "1" if undoable else "0",
            field.GUEST_AGENT: "1" if guest_agent else "0",
            field.KERNEL: kernel or "", field.INITRD: initrd or "", field.APPEND: append or "",
            field.CREATED: repr(time.time()),
        }
        with broker_errors(self.url):
            created = self.scripts.vm_create(
                record=keys.vm_record(name), names=keys.VM_NAMES,
                host_vms=keys.host_vms(fields[field.HOST]), name=name, fields=to_args(fields))
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
        """Every VM of every host: O(fleet VMs), as a listing of the fleet must be, in
        two round trips (the names; then their records, by a script per page of
        names, so Redis is never held long by one call and the reply is parsed in C)."""
        with broker_errors(self.url):
            names = sorted(self.redis.smembers(keys.VM_NAMES))
            pages = [names[i:i + VM_PAGE] for i in range(0, len(names), VM_PAGE)]

            def build(pipe: Any) -> None:
                for page in pages:
                    self.scripts.vm_records.queue(
                        pipe, records=[keys.vm_record(name) for name in page],
                        fields=LISTED_FIELDS)

            replies = pipelined(self.redis, build, self.scripts) if pages else []
        return [VirtualMachine(self, {f: v for f, v in zip(LISTED_FIELDS, r, strict=True)
                                      if v is not None})
                for page in replies for r in page if r]

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
