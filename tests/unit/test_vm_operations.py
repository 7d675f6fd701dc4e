"""A VM operation's name is defined once, by its task name: the state machine's
table and the bodies follow it, and a mismatch fails the import."""

from __future__ import annotations

import pytest

from api.enums import VMVMState as S
from api.protocol import tasks, vmstate


def test_every_vm_task_has_its_states_and_every_entry_an_operation() -> None:
    assert set(tasks.VM_OPERATIONS) <= set(vmstate.ALLOWED)
    assert set(vmstate.ALLOWED) - set(tasks.VM_OPERATIONS) == vmstate.PRODUCER_ONLY
    assert tasks.VM_STARTUP.vm_operation == "startup"
    assert tasks.VM_OPERATIONS["startup"] is tasks.VM_STARTUP


def test_a_misspelt_or_missing_entry_is_refused() -> None:
    allowed = dict(vmstate.ALLOWED)
    allowed["start_up"] = allowed.pop("startup")
    with pytest.raises(TypeError, match=r"lacks the VM tasks \['startup'\].*\['start_up'\]"):
        vmstate.check_operations(allowed, tasks.VM_OPERATIONS)
    operations = {**tasks.VM_OPERATIONS,
                  "snooze": tasks.TaskSpec("vmtask.vm.snooze", ("name",), cancelable=False)}
    with pytest.raises(TypeError, match=r"lacks the VM tasks \['snooze'\]"):
        vmstate.check_operations(vmstate.ALLOWED, operations)
    vmstate.check_operations({**vmstate.ALLOWED, "snooze": frozenset({S.Running})}, operations)


def test_a_task_that_is_no_vm_operation_has_no_vm_operation_name() -> None:
    with pytest.raises(ValueError, match=r"vmtask\.disk\.convert is not a VM operation"):
        _ = tasks.DISK_CONVERT.vm_operation
    assert tasks.VM_LIVE_OUT not in tasks.VM_OPERATIONS.values()
