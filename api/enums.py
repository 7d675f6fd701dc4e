"""The Virtual Server enumerations, with the values of the original API reference."""

from __future__ import annotations

from enum import IntEnum

# The values of VMTASK_ACCEL: which accelerator QEMU uses (auto: KVM where it works).
ACCELERATORS = ("auto", "kvm", "tcg")


class VMTaskResult(IntEnum):
    Success = 0
    Cancelled = 1
    UnexpectedError = 2
    OutOfMemoryError = 3
    DiskRelatedError = 4
    IncompatibleSavedStateError = 5
    TimeOutError = 6
    IllegalValueError = 7
    ThreadCrashError = 8


class VMVMState(IntEnum):
    Invalid = 0
    TurnedOff = 1
    Saved = 2
    TurningOn = 3
    Restoring = 4
    Running = 5
    Paused = 6
    Saving = 7
    TurningOff = 8
    MergingDrives = 9
    DeleteMachine = 10


class VMHardDiskType(IntEnum):
    Dynamic = 0
    FixedSize = 1
    Differencing = 2
    HostDrive = 3
