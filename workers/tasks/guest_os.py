"""Guest OS operations (IVMGuestOS): shutdown, restart and logoff of a running VM's
guest, through its QEMU guest agent, with the ACPI power button for shutdown.

A real guest's agent answers on while its OS goes down (``shutdown -r +0`` returns at
once), so a delivered request proves nothing: a restart is done when a new boot
answers, a shutdown when QEMU has exited.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack

from api.enums import VMVMState as S
from api.protocol import tasks
from workers.engines import qemu_vm
from workers.engines.guest_agent import GuestAgentClient, ShutdownMode
from workers.failures import (
    Cancelled,
    GuestAgentError,
    IllegalValue,
    OperationFailed,
    OperationTimedOut,
)
from workers.runtime import TaskRun, operation
from workers.tasks.vms import agent_socket, begin, paths_of, settle, vm_lock

log = logging.getLogger(__name__)

ACPI_PRESS_INTERVAL = 1.0
# How often a guest that was asked to go down is looked at through its agent.
GUEST_POLL_INTERVAL = 0.5
GUEST_PROBE_TIMEOUT = 2.0
# After this long without powering off, a guest told through its agent also gets
# ACPI power-button presses (its agent may be gone for good).
ACPI_FALLBACK_AFTER = 15.0


def wait_for_agent(run: TaskRun, paths: qemu_vm.VMPaths, deadline: float) -> GuestAgentClient:
    """The guest is ready once its agent answers: the analogue of VS's heartbeat."""
    while True:
        if run.cancel_requested():
            raise Cancelled()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise OperationTimedOut("The guest agent did not answer in time")
        agent = GuestAgentClient(agent_socket(paths))
        try:
            if agent.ping(timeout=min(2.0, remaining)):
                return agent
        except OperationTimedOut:
            pass
        agent.close()


def refused(name: str, what: str, exc: GuestAgentError) -> OperationFailed:
    """The guest's agent said no: its own words, as UnexpectedError (E_UNEXPECTED) when
    the guest failed, IllegalValueError when the agent lacks or blocks the command."""
    text = f"The guest of {name!r} refused to {what}: {exc}"
    if exc.error_class in ("CommandNotFound", "CommandDisabled"):
        return IllegalValue(text)
    return OperationFailed(text)


def probe_boot(agent: GuestAgentClient) -> tuple[bool, str | None]:
    """Whether the agent answers now, and the boot id it reports (None when the
    guest has none to give, as a non-Linux guest)."""
    try:
        agent.ping(timeout=GUEST_PROBE_TIMEOUT)
    except (OperationTimedOut, GuestAgentError):
        return False, None
    try:
        return True, agent.boot_id(timeout=GUEST_PROBE_TIMEOUT)
    except (OperationTimedOut, GuestAgentError):
        return True, None


def ask_agent(agent: GuestAgentClient, name: str, mode: ShutdownMode, what: str) -> None:
    try:
        agent.shutdown(mode)
    except GuestAgentError as exc:
        if exc.error_class:
            raise refused(name, what, exc) from exc
        # The connection broke on the way: whether it arrived is learnt from the VM.
        log.warning("guest %s: %s request may not have arrived: %s", name, mode, exc)


@operation(tasks.VM_GUEST_SHUTDOWN)
def guest_shutdown(run: TaskRun, name: str, timeout_s: int = 120) -> None:
    """Done when QEMU has exited.  A guest's agent answers on while its OS goes
    down, so a request can land in a boot that is already ending (a restart just
    asked for) and be lost: the request is sent again when a new boot (a new boot
    id) answers, and the ACPI button is pressed too once the guest takes too long."""
    with vm_lock(run, name):
        client, record, _ = begin(run, name, S.TurningOff)
        paths = paths_of(run.settings, name)
        deadline = time.monotonic() + timeout_s
        with_agent = record.get("guest_agent") == "1"
        try:
            with ExitStack() as stack:
                agent: GuestAgentClient | None = None
                sent_to: str | None = None
                # Without an agent, press the ACPI button until the guest obeys: a press
                # made before the guest's ACPI handler is up is lost, so one is not enough.
                next_press = time.monotonic()
                if with_agent:
                    agent = stack.enter_context(wait_for_agent(run, paths, deadline))
                    sent_to = probe_boot(agent)[1]
                    ask_agent(agent, name, "powerdown", "shut down")
                    next_press = time.monotonic() + ACPI_FALLBACK_AFTER
                next_probe = time.monotonic() + GUEST_POLL_INTERVAL
                while qemu_vm.is_alive(paths):
                    if run.cancel_requested():
                        raise Cancelled()
                    if time.monotonic() > deadline:
                        raise OperationTimedOut(
                            f"The guest of {name!r} did not shut down within {timeout_s} s")
                    if agent is not None and time.monotonic() >= next_probe:
                        answers, boot = probe_boot(agent)
                        if answers and boot is not None and sent_to is not None \
                                and boot != sent_to and qemu_vm.is_alive(paths):
                            log.info("guest %s: a new boot answers; asking it again", name)
                            sent_to = boot
                            ask_agent(agent, name, "powerdown", "shut down")
                        next_probe = time.monotonic() + GUEST_POLL_INTERVAL
                    if time.monotonic() >= next_press:
                        try:
                            qemu_vm.powerdown(paths)
                        except OperationFailed:
                            if qemu_vm.is_alive(paths):
                                raise
                            break  # it went off between the check and the press
                        next_press = time.monotonic() + ACPI_PRESS_INTERVAL
                    time.sleep(0.05)
            qemu_vm.cleanup(paths)
        finally:
            settle(client, name, qemu_vm.vm_state(paths))


@operation(tasks.VM_GUEST_RESTART)
def guest_restart(run: TaskRun, name: str, timeout_s: int = 120) -> None:
    """Done once the guest has really rebooted: its agent reports a new boot id (or,
    for a guest without one, its agent fell silent and answers again).  The old
    boot's agent answers on while the OS goes down, so delivery proves nothing."""
    with vm_lock(run, name):
        _client, record, _ = begin(run, name, None)
        if record.get("guest_agent") != "1":
            raise IllegalValue(f"Restarting the guest of {name!r} needs its guest agent "
                               "(create the VM with guest_agent=True)")
        paths = paths_of(run.settings, name)
        deadline = time.monotonic() + timeout_s
        agent = wait_for_agent(run, paths, deadline)
        with agent:
            before = probe_boot(agent)[1]
            ask_agent(agent, name, "reboot", "restart")
            fell_silent = False
            while True:
                if run.cancel_requested():
                    raise Cancelled()
                if time.monotonic() > deadline:
                    raise OperationTimedOut(
                        f"The guest of {name!r} did not come back from its restart "
                        f"within {timeout_s} s")
                if not qemu_vm.is_alive(paths):
                    raise OperationFailed(f"The guest of {name!r} powered off instead of "
                                          "restarting")
                answers, boot = probe_boot(agent)
                if answers and (boot not in (None, before) if before is not None
                                else fell_silent):
                    return
                fell_silent = fell_silent or not answers
                time.sleep(GUEST_POLL_INTERVAL)


@operation(tasks.VM_GUEST_LOGOFF)
def guest_logoff(run: TaskRun, name: str, timeout_s: int = 120) -> None:
    with vm_lock(run, name):
        begin(run, name, None)
        raise IllegalValue("The QEMU guest agent has no log-off command; "
                           "logoff is not supported for QEMU guests")
