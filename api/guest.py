"""`GuestOS` (IVMGuestOS): requests to a VM's guest, through its agent or the ACPI
power button, and what the guest agent says about the guest."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from api.arguments import check_int
from api.enums import VMVMState
from api.protocol import tasks
from api.task import VMTask

if TYPE_CHECKING:
    from api.vms import VirtualMachine

DEFAULT_GUEST_TIMEOUT_S = 120


MAX_GUEST_TIMEOUT_S = 3600


def _timeout(value: int) -> int:
    return check_int("timeout_s", value, 1, MAX_GUEST_TIMEOUT_S)


class GuestOS:
    """IVMGuestOS: requests to the guest, through its agent or the ACPI power button."""

    def __init__(self, vm: VirtualMachine) -> None:
        self._vm = vm

    def shutdown(self, timeout_s: int = DEFAULT_GUEST_TIMEOUT_S) -> VMTask:
        """Ask the guest to power off; TimeOutError (VM still running) if it ignores us."""
        return self._vm._operate(tasks.VM_GUEST_SHUTDOWN, "Shutting down the guest of",
                                 timeout_s=_timeout(timeout_s))

    def restart(self, timeout_s: int = DEFAULT_GUEST_TIMEOUT_S) -> VMTask:
        return self._vm._operate(tasks.VM_GUEST_RESTART, "Restarting the guest of",
                                 timeout_s=_timeout(timeout_s))

    def logoff(self, timeout_s: int = DEFAULT_GUEST_TIMEOUT_S) -> VMTask:
        return self._vm._operate(tasks.VM_GUEST_LOGOFF, "Logging off the guest of",
                                 timeout_s=_timeout(timeout_s))

    def _info(self) -> dict[str, Any]:
        """The agent's answers, read on the VM's host; empty without a running agent."""
        if not self._vm.guest_agent or self._vm.state is not VMVMState.Running:
            return {}
        output = self._vm._server.run_quick(
            tasks.VM_GUEST_INFO, description=f"Asking the guest agent of {self._vm.name}",
            kwargs={"name": self._vm.name}, host=self._vm.host)
        return output if isinstance(output, dict) else {}

    @property
    def is_heartbeating(self) -> bool:
        """The guest agent answers (the analogue of Virtual Server's heartbeat)."""
        return bool(self._info().get("heartbeating"))

    @property
    def os_name(self) -> str | None:
        """The guest's OS name from ``guest-get-osinfo``; None without an agent."""
        name = self._info().get("os_name")
        return name if isinstance(name, str) else None

    @property
    def network_interfaces(self) -> list[dict[str, Any]]:
        """Each interface the agent reports: ``name``, ``mac`` and ``addresses``
        (``"10.0.2.15/24"``); empty without an agent."""
        interfaces = self._info().get("network_interfaces")
        return interfaces if isinstance(interfaces, list) else []
