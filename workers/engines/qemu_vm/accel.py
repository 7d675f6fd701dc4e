"""Choosing the accelerator: KVM only where a timed probe shows it runs at speed.

`probe_accel` boots a tiny ROM under TCG and under KVM and compares wall times, once
per process and host; `choose_accel` turns a configured setting into "kvm" or "tcg".
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from api.enums import ACCELERATORS
from workers.engines.qemu_vm.config import QEMU_SYSTEM
from workers.failures import IllegalValue

# A 64 KiB BIOS image that replaces SeaBIOS for the probe: the reset vector jumps to a
# real-mode loop of _PROBE_OUTER x _PROBE_INNER `dec ecx; jnz` iterations, with one
# port write (a VM exit) per outer round, then writes to isa-debug-exit, which makes
# QEMU exit with status 1.  No firmware, no devices: the run time is QEMU's start-up
# plus the guest's instruction rate, which is what "KVM runs at speed" means.
_PROBE_OUTER = 200
_PROBE_INNER = 400_000
_PROBE_EXIT_STATUS = 1
_PROBE_TCG_TIMEOUT = 1.0
_PROBE_LOOP = bytes(
    [
        0x66, 0x49,  # inner: dec ecx
        0x75, 0xFC,  # jnz inner
        0xE6, 0x80,  # out 0x80, al          (a VM exit under KVM)
        0x4B,        # dec bx
        0x75, 0xF1,  # jnz outer
        0xB0, 0x00,  # mov al, 0
        0xE6, 0xF4,  # out 0xf4, al          (isa-debug-exit: QEMU exits with 1)
        0xF4,        # hlt
        0xEB, 0xFD,  # jmp hlt
    ]
)  # fmt: skip


def _probe_rom(outer: int = _PROBE_OUTER, inner: int = _PROBE_INNER) -> bytes:
    code = b"\xbb" + struct.pack("<H", outer)  # mov bx, outer
    code += b"\x66\xb9" + struct.pack("<I", inner)  # outer: mov ecx, inner
    code += _PROBE_LOOP
    image = bytearray(0x10000)
    image[: len(code)] = code
    # Reset vector (F000:FFF0): far jump to F000:0000, the start of the image.
    image[0xFFF0:0xFFF5] = b"\xea\x00\x00\x00\xf0"
    return bytes(image)


@dataclass(frozen=True)
class AccelProbe:
    """The verdict of `probe_accel` and the wall times it was based on."""

    verdict: str
    tcg_seconds: float | None
    kvm_seconds: float | None  # None: unusable, failed, or slower than TCG (cut off)
    detail: str


_accel_cache: dict[tuple[str, str], AccelProbe] = {}
_accel_lock = threading.Lock()


def _kvm_usable() -> bool:
    return os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)


def _time_probe(rom: Path, accel: str, timeout: float) -> float | None:
    argv = [
        QEMU_SYSTEM, "-accel", accel, "-machine", "pc", "-m", "16", "-nodefaults",
        "-no-user-config", "-display", "none", "-bios", str(rom),
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]  # fmt: skip
    began = time.monotonic()
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
    except (subprocess.TimeoutExpired, OSError):
        return None
    elapsed = time.monotonic() - began
    return elapsed if done.returncode == _PROBE_EXIT_STATUS else None


def _run_probe() -> AccelProbe:
    """Time the same small guest workload under TCG and under KVM (< ~1 s).

    KVM wins only if it finishes sooner than TCG did: a real KVM runs the loop at
    native speed, while an emulated or badly nested one is orders of magnitude slower
    and is cut off at TCG's time, so the probe never waits longer than TCG took.
    """
    if not _kvm_usable():
        return AccelProbe("tcg", None, None, "/dev/kvm is missing or not accessible")
    with tempfile.TemporaryDirectory(prefix="vmtask-accel-") as tmp:
        rom = Path(tmp) / "probe.rom"
        rom.write_bytes(_probe_rom())
        tcg = _time_probe(rom, "tcg", _PROBE_TCG_TIMEOUT)
        kvm = _time_probe(rom, "kvm", tcg if tcg is not None else _PROBE_TCG_TIMEOUT)
    if kvm is not None and (tcg is None or kvm < tcg):
        return AccelProbe("kvm", tcg, kvm, "KVM ran the probe faster than TCG")
    if kvm is None:
        detail = "KVM did not finish the probe within TCG's time"
    else:
        detail = "KVM was slower than TCG"
    return AccelProbe("tcg", tcg, kvm, detail)


def probe_accel(*, refresh: bool = False) -> AccelProbe:
    """The accelerator probe's result, run once per process and host unless ``refresh``."""
    key = (socket.gethostname(), shutil.which(QEMU_SYSTEM) or QEMU_SYSTEM)
    # Held during the probe, so concurrent first callers wait for one probe.
    with _accel_lock:
        probe = _accel_cache.get(key)
        if probe is None or refresh:
            probe = _accel_cache[key] = _run_probe()
        return probe


def choose_accel(setting: str = "auto") -> str:
    """``"kvm"`` or ``"tcg"``; ``"auto"`` picks KVM only if `probe_accel` found it fast."""
    if setting == "tcg":
        return "tcg"
    if setting == "kvm":
        if not _kvm_usable():
            raise IllegalValue("The KVM accelerator was requested but /dev/kvm is not usable")
        return "kvm"
    if setting != "auto":
        raise IllegalValue(f"Illegal accelerator {setting!r}: one of {ACCELERATORS}")
    return probe_accel().verdict
