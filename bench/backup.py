"""Backups (issue 24): full backup throughput, incremental cost and restore throughput,
each against ``qemu-img`` on the same files in the same run.

A 1 GiB disk holding 512 MiB of data.  Rows:

- full backup with the tiny guest running (``vm.backup``, task submitted to done)
  against ``qemu-img convert -O qcow2`` of the same image (VM off); throughput ratio,
  target >= 0.9;
- incremental after 1% of the data changed (80 scattered 64 KiB writes, VM off):
  bytes read and written against the changed data, target <= 1.1x plus metadata;
  time against the full backup's, target <= 10%;
- restore of the newest of 5 incrementals (``server.restore_backup``) against
  ``qemu-img convert -O qcow2`` of the same chain; throughput ratio, target >= 0.9.

- the guest's stall: the job never pauses the guest; its I/O is drained only while
  the QMP transaction that starts the jobs runs (timed by the worker, read from the
  task's log), target <= 50 ms.

BENCH_ROUNDS rounds (default 3) of the full and restore rows, sides alternating.
Files live in /dev/shm when it exists; BENCH_DIR overrides.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api import VirtualMachine, VirtualServer, VMTaskResult
from api.task import VMTask
from bench.common import record_row, stack, verdict
from workers.devtools.tinyguest import build_tiny_guest

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CLUSTER = 64 * 1024
CHANGES = 80  # 80 x 64 KiB = 5 MiB, 1% of 512 MiB
MiB = 1024 * 1024


def done(task: VMTask) -> None:
    assert task.wait_for_completion(-1)
    assert task.result is VMTaskResult.Success, task.error_description


def timed(call: Callable[..., VMTask], *args: Any, **kwargs: Any) -> tuple[float, VMTask]:
    """Submit ``call(*args, **kwargs)`` and wait: the wall time, submit to done."""
    started = time.perf_counter()
    task = call(*args, **kwargs)
    done(task)
    return time.perf_counter() - started, task


def drained_ms(task: VMTask) -> float:
    """How long the QMP transaction that starts the jobs held the guest's I/O drained,
    from the task's log."""
    for line in task.log():
        found = re.search(r"backup jobs started in ([0-9.]+) ms", line)
        if found:
            return float(found.group(1))
    raise AssertionError("no 'backup jobs started' line in the task's log")


def qemu_img_convert(source: Path, out: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(source), str(out)], check=True)
    took = time.perf_counter() - started
    out.unlink()
    return took


def change_one_percent(disk: Path, round_number: int) -> None:
    writes = [arg for i in range(CHANGES)
              for arg in ("-c", f"write -P {0x10 + round_number} {i * 6 * MiB + CLUSTER} 64k")]
    subprocess.run(["qemu-io", "-f", "qcow2", *writes, str(disk)], check=True,
                   capture_output=True)


def main() -> None:
    guest = build_tiny_guest()
    default_dir = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with stack(bare=False, directory=os.environ.get("BENCH_DIR", default_dir)) as s:
        server: VirtualServer = s.server
        (s.storage / "guest").mkdir()
        shutil.copy(guest.kernel, s.storage / "guest" / "vmlinuz")
        shutil.copy(guest.initrd, s.storage / "guest" / "initrd.gz")
        done(server.create_dynamic_virtual_hard_disk("src/disk.qcow2", 1024))
        disk = s.storage / "src" / "disk.qcow2"
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 256M 512M", str(disk)],
                       check=True, capture_output=True)
        vm: VirtualMachine = server.create_virtual_machine(
            "src", memory_mb=128, disks=["src/disk.qcow2"], network=None,
            kernel="guest/vmlinuz", initrd="guest/initrd.gz", append="console=ttyS0 quiet")

        # Full backups, VM running, against qemu-img convert with the VM off.
        full_times: list[float] = []
        stalls: list[float] = []
        convert_times: list[float] = []
        for r in range(ROUNDS):
            sides = ["vmtask", "qemu-img"] if r % 2 == 0 else ["qemu-img", "vmtask"]
            for side in sides:
                if side == "qemu-img":
                    convert_times.append(qemu_img_convert(disk, s.tmp / "convert.qcow2"))
                    continue
                done(vm.startup())
                took, task = timed(vm.backup, f"full{r}", full=True)
                full_times.append(took)
                stalls.append(drained_ms(task))
                done(vm.turn_off())
                shutil.rmtree(s.storage / f"full{r}")
        data = 512 * MiB
        full_rate = data / statistics.median(full_times)
        convert_rate = data / statistics.median(convert_times)
        full_ratio = full_rate / convert_rate

        # A chain of 5 incrementals over one full backup, 1% changed before each.
        full_s, task = timed(vm.backup, "chain")
        incremental: list[tuple[float, int, int]] = []
        for r in range(5):
            change_one_percent(disk, r)
            took, task = timed(vm.backup, "chain")
            out = task.snapshot().output
            assert out["kind"] == "incremental", out
            incremental.append((took, int(out["bytes_read"]), int(out["bytes_written"])))
        changed = CHANGES * CLUSTER
        inc_time = statistics.median(t for t, _, _ in incremental)
        inc_read = max(b for _, b, _ in incremental)
        inc_written = max(w for _, _, w in incremental)
        read_met = inc_read <= 1.1 * changed
        time_met = inc_time <= 0.1 * full_s

        # Restore of the newest against qemu-img convert of the same chain.
        newest = server.backups("chain")[-1]
        top = s.storage / "chain" / newest.id / "disk-0.qcow2"
        restore_times: list[float] = []
        chain_times: list[float] = []
        for r in range(ROUNDS):
            sides = ["vmtask", "qemu-img"] if r % 2 == 0 else ["qemu-img", "vmtask"]
            for side in sides:
                if side == "qemu-img":
                    chain_times.append(qemu_img_convert(top, s.tmp / "chain.qcow2"))
                    continue
                name = f"r{uuid.uuid4().hex[:6]}"
                took, _ = timed(server.restore_backup, "chain", newest.id, name)
                restore_times.append(took)
                made = server.find_virtual_machine(name)
                assert made is not None
                done(made.delete())
                shutil.rmtree(s.storage / "vms" / name, ignore_errors=True)
        restore_ratio = statistics.median(chain_times) / statistics.median(restore_times)

    print(f"full backup of 512 MiB of data, VM running, {ROUNDS} rounds: "
          f"{full_rate / MiB:.0f} MiB/s; qemu-img convert {convert_rate / MiB:.0f} MiB/s; "
          f"{full_ratio:.2f}x, target >= 0.9: {verdict(full_ratio >= 0.9)}")
    stall = max(stalls)
    print(f"guest stall while the backup of the running VM starts (QMP transaction, I/O "
          f"drained): max {stall:.1f} ms of {len(stalls)}; target <= 50 ms: "
          f"{verdict(stall <= 50)}")
    print(f"incremental after 1% changed ({changed // 1024} KiB in {CHANGES} clusters): "
          f"read {inc_read // 1024} KiB, wrote {inc_written // 1024} KiB (with metadata), "
          f"{inc_time * 1000:.0f} ms vs the full backup's {full_s * 1000:.0f} ms "
          f"({100 * inc_time / full_s:.1f}%); read <= 1.1x: {verdict(read_met)}, "
          f"time <= 10%: {verdict(time_met)}")
    print(f"restore of the newest of 5 incrementals: {statistics.median(restore_times):.2f} s; "
          f"qemu-img convert of the chain {statistics.median(chain_times):.2f} s; "
          f"{restore_ratio:.2f}x, target >= 0.9: {verdict(restore_ratio >= 0.9)}")
    record_row("full backup, 512 MiB of data, VM running: throughput",
               f"{full_rate / MiB:.0f} MiB/s", f"qemu-img convert {convert_rate / MiB:.0f} MiB/s",
               f"{full_ratio:.2f}x", ">= 0.9x", full_ratio >= 0.9)
    record_row("backup of a running VM: guest I/O drained (QMP transaction), max",
               f"{stall:.1f} ms", "-", "-", "<= 50 ms", stall <= 50)
    record_row("incremental after 1% changed: bytes read / changed",
               f"{inc_read // 1024} KiB", f"{changed // 1024} KiB",
               f"{inc_read / changed:.2f}x", "<= 1.1x", read_met)
    record_row("incremental after 1% changed: time / full backup's",
               f"{inc_time * 1000:.0f} ms", f"{full_s * 1000:.0f} ms",
               f"{100 * inc_time / full_s:.1f}%", "<= 10%", time_met)
    record_row("restore of the newest of 5 incrementals: throughput",
               f"{statistics.median(restore_times):.2f} s",
               f"qemu-img convert {statistics.median(chain_times):.2f} s",
               f"{restore_ratio:.2f}x", ">= 0.9x", restore_ratio >= 0.9)


if __name__ == "__main__":
    main()
