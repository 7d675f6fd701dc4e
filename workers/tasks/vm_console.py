"""What a user reads from a VM on its host, as quick tasks: a screenshot, the serial
console log and what the guest agent says.  None changes the VM's state, so they
take no VM lock: a screenshot never waits behind a save.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import redis

from api.enums import VMVMState as S
from api.errors import InvalidStateError
from api.protocol import tasks
from api.protocol.vmstate import ALLOWED
from api.settings import Settings
from workers.engines import qemu_vm
from workers.engines.guest_agent import GuestAgentClient
from workers.failures import GuestAgentError, IllegalValue, OperationFailed, OperationTimedOut
from workers.runtime import TaskRun, operation
from workers.tasks.vms import agent_socket, beat_vms, operation_of, paths_of, record_of

log = logging.getLogger(__name__)

AGENT_TIMEOUT = 5.0


def _require(run: TaskRun, name: str) -> dict[str, str]:
    record = record_of(run.redis, run.settings, name)
    state = S(int(record["state"]))
    operation_name = operation_of(run)
    if state not in ALLOWED[operation_name]:
        raise InvalidStateError(f"Cannot take the {operation_name.replace('_', ' ')} of VM "
                                f"{name!r} while it is {state.name}")
    return record


@operation(tasks.VM_SCREENSHOT, soft_time_limit=60)
def screenshot(run: TaskRun, name: str) -> dict[str, str]:
    _require(run, name)
    png = qemu_vm.screendump(paths_of(run.settings, name))
    return {"png": base64.b64encode(png).decode("ascii")}


@operation(tasks.VM_CONSOLE_LOG, soft_time_limit=60)
def console_log(run: TaskRun, name: str, tail_bytes: int) -> dict[str, str]:
    _require(run, name)
    if not 1 <= tail_bytes <= 4 * 1024 * 1024:
        raise IllegalValue(f"tail_bytes must be in 1..4194304, not {tail_bytes}")
    return {"text": qemu_vm.read_console(paths_of(run.settings, name), tail_bytes)}


def _interfaces(raw: Any) -> list[dict[str, Any]]:
    """qemu-ga's ``guest-network-get-interfaces`` as name, mac and CIDR addresses."""
    interfaces: list[dict[str, Any]] = []
    for entry in raw if isinstance(raw, list) else []:
        if not isinstance(entry, dict):
            continue
        addresses = [f"{a.get('ip-address')}/{a.get('prefix')}"
                     for a in entry.get("ip-addresses") or [] if isinstance(a, dict)]
        interfaces.append({"name": entry.get("name"), "mac": entry.get("hardware-address"),
                           "addresses": addresses})
    return interfaces


@operation(tasks.VM_GUEST_INFO, soft_time_limit=60)
def guest_info(run: TaskRun, name: str) -> dict[str, Any]:
    record = _require(run, name)
    answer: dict[str, Any] = {"heartbeating": False, "os_name": None, "network_interfaces": []}
    if record.get("guest_agent") != "1":
        return answer
    with GuestAgentClient(agent_socket(paths_of(run.settings, name))) as agent:
        try:
            answer["heartbeating"] = agent.ping(timeout=AGENT_TIMEOUT)
        except (OperationTimedOut, GuestAgentError):
            return answer
        try:
            osinfo = agent.execute("guest-get-osinfo", timeout=AGENT_TIMEOUT)
            if isinstance(osinfo, dict):
                answer["os_name"] = osinfo.get("pretty-name") or osinfo.get("name")
            answer["network_interfaces"] = _interfaces(
                agent.execute("guest-network-get-interfaces", timeout=AGENT_TIMEOUT))
        except (OperationTimedOut, GuestAgentError) as exc:
            log.info("The agent of %s answered ping but not %s", name, exc)
    return answer


def rotate_console_logs(client: redis.Redis, settings: Settings) -> None:
    """Keep every VM's serial log bounded (the host's tick)."""
    for record in beat_vms(client, settings):
        try:
            qemu_vm.rotate_serial_log(paths_of(settings, record["name"]),
                                      settings.console_log_max_bytes)
        except (OSError, OperationFailed) as exc:
            log.warning("Could not rotate the console log of %s: %s", record["name"], exc)
