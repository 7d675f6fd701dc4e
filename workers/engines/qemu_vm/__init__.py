"""VM engine: real QEMU processes driven over QMP.

This is the process/QMP layer only.  The task system wraps these functions in Celery
tasks, owns the per-VM lock and keeps the authoritative `VMVMState` in Redis; nothing
here talks to Redis or Celery.  All functions are synchronous; each QMP connection
runs its own private event loop, so they must not be called from inside a running
asyncio loop.

The modules, each importing only those above it:

* `config`: `VMConfig`, `VMPaths`, the configuration fingerprint, disk formats.
* `accel`: the accelerator probe and `choose_accel`.
* `process`: finding, waiting for, killing and cleaning up after a VM's QEMU.
* `statefile`: the saved state file and its fingerprint file.
* `monitor`: the QMP connection and the simple commands (pause, turn_off, ...).
* `devices`: the command-line pieces of CPUs, NIC, display and VNC.
* `console`: screendump, the VNC password, the serial console log.
* `lifecycle`: QEMU's command line, `start` (boot, or restore from a saved state),
  `OpenedFiles` (a VM's files handed to QEMU by descriptor).
* `savestate`: `save`.

This package re-exports what the task system and the tests use.
"""

from __future__ import annotations

from workers.engines.qemu_vm.accel import AccelProbe, choose_accel, probe_accel
from workers.engines.qemu_vm.config import VMConfig, VMPaths, config_fingerprint, disk_format
from workers.engines.qemu_vm.console import (
    read_console,
    rotate_serial_log,
    screendump,
    setup_vnc,
)
from workers.engines.qemu_vm.lifecycle import OpenedFiles, build_argv, start
from workers.engines.qemu_vm.monitor import (
    Monitor,
    connect,
    pause,
    powerdown,
    query_status,
    reset,
    resume,
    turn_off,
    vm_state,
)
from workers.engines.qemu_vm.process import cleanup, find_pid, is_alive, wait_for_exit
from workers.engines.qemu_vm.savestate import save
from workers.engines.qemu_vm.statefile import discard_saved_state, read_saved_state_info

__all__ = [
    "AccelProbe",
    "Monitor",
    "OpenedFiles",
    "VMConfig",
    "VMPaths",
    "build_argv",
    "choose_accel",
    "cleanup",
    "config_fingerprint",
    "connect",
    "discard_saved_state",
    "disk_format",
    "find_pid",
    "is_alive",
    "pause",
    "powerdown",
    "probe_accel",
    "query_status",
    "read_console",
    "read_saved_state_info",
    "reset",
    "resume",
    "rotate_serial_log",
    "save",
    "screendump",
    "setup_vnc",
    "start",
    "turn_off",
    "vm_state",
    "wait_for_exit",
]
