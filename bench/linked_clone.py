"""A linked clone's cost does not grow with the disk (issue 23): ``vm.clone(...,
linked=True, snapshot=...)`` of a VM with a 1 GiB disk and of one with an 8 GiB disk
(1 MiB written every 128 MiB of each), against a bare ``qemu-img create -f qcow2 -b
<the snapshot's layer>`` of the same disk, in one run.

BENCH_ROUNDS rounds (default 10), each cloning both VMs both ways, the order
rotating.  Files live in /dev/shm when it exists; BENCH_DIR overrides.
Targets: vmtask 8 GiB / 1 GiB <= 1.2 (median of per-round ratios), and each adds
<= 0.5 s over its bare ``qemu-img create -b`` (median of per-round differences).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api import VMTaskResult
from bench.common import ROUNDS, record_row, stack, verdict

SIZES_GIB = (1, 8)
STRIDE_MIB = 128
TARGET_RATIO = 1.2
TARGET_ADDED_S = 0.5


def main() -> None:
    default_dir = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with stack(bare=False, directory=os.environ.get("BENCH_DIR", default_dir)) as s:
        server = s.server
        layers: dict[int, Path] = {}
        vms = {}
        for gib in SIZES_GIB:
            disk = f"src{gib}/disk.qcow2"
            task = server.create_dynamic_virtual_hard_disk(disk, gib * 1024)
            assert task.wait_for_completion(-1) and task.result is VMTaskResult.Success
            writes = [arg for offset in range(0, gib * 1024, STRIDE_MIB)
                      for arg in ("-c", f"write -P 0x5a {offset}M 1M")]
            subprocess.run(["qemu-io", "-f", "qcow2", *writes, str(s.storage / disk)],
                           check=True, capture_output=True)
            vm = server.create_virtual_machine(f"src{gib}", memory_mb=64, disks=[disk])
            task = vm.create_snapshot("s")
            assert task.wait_for_completion(-1) and task.result is VMTaskResult.Success
            tree = json.loads((s.storage / "vms" / vm.name / "snapshots" / "tree.json")
                              .read_text())
            layers[gib] = s.storage / "vms" / vm.name / "snapshots" / \
                f"{tree['snapshots'][0]['layer']}-0.qcow2"
            vms[gib] = vm

        def vmtask_clone(gib: int) -> float:
            name = f"c{gib}-{uuid.uuid4().hex[:8]}"
            started = time.perf_counter()
            task = vms[gib].clone(name, linked=True, snapshot="s")
            assert task.wait_for_completion(-1)
            took = time.perf_counter() - started
            assert task.result is VMTaskResult.Success, task.error_description
            clone = server.find_virtual_machine(name)
            assert clone is not None
            assert clone.delete().wait_for_completion(-1)  # outside the measured time
            return took

        def bare_create(gib: int) -> float:
            out = s.storage / f"bare-{uuid.uuid4().hex[:8]}.qcow2"
            started = time.perf_counter()
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(layers[gib]),
                            "-F", "qcow2", str(out)], check=True)
            took = time.perf_counter() - started
            out.unlink()
            return took

        sides = [(kind, gib) for gib in SIZES_GIB for kind in ("vmtask", "bare")]
        times: dict[tuple[str, int], list[float]] = {side: [] for side in sides}
        for side in sides:  # warm-up
            (vmtask_clone if side[0] == "vmtask" else bare_create)(side[1])
        for r in range(ROUNDS):
            k = r % len(sides)
            for kind, gib in sides[k:] + sides[:k]:
                times[(kind, gib)].append((vmtask_clone if kind == "vmtask" else bare_create)(gib))

    def ms(side: tuple[str, int]) -> float:
        return statistics.median(times[side]) * 1000

    ratios = [b / a for a, b in zip(times[("vmtask", 1)], times[("vmtask", 8)], strict=True)]
    size_ratio = statistics.median(ratios)
    added = {gib: statistics.median(v - b for v, b in zip(times[("vmtask", gib)],
                                                         times[("bare", gib)], strict=True))
             for gib in SIZES_GIB}
    ratio_met = size_ratio <= TARGET_RATIO
    added_met = all(a <= TARGET_ADDED_S for a in added.values())
    print(f"linked clone, {ROUNDS} rotating rounds (1 MiB written every {STRIDE_MIB} MiB):")
    for gib in SIZES_GIB:
        print(f"  {gib} GiB: vmtask clone + wait {ms(('vmtask', gib)):7.1f} ms, bare "
              f"qemu-img create -b {ms(('bare', gib)):6.1f} ms, added {added[gib] * 1000:+.1f} ms")
    print(f"vmtask 8 GiB / 1 GiB: {size_ratio:.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f}); "
          f"target <= {TARGET_RATIO}: {verdict(ratio_met)}")
    print(f"added over bare qemu-img create -b: target <= {TARGET_ADDED_S} s each: "
          f"{verdict(added_met)}")
    record_row("linked clone, 8 GiB vs 1 GiB disk", f"{ms(('vmtask', 8)):.0f} ms",
               f"1 GiB {ms(('vmtask', 1)):.0f} ms", f"{size_ratio:.2f}x",
               f"<= {TARGET_RATIO}x", ratio_met)
    for gib in SIZES_GIB:
        record_row(f"linked clone of a {gib} GiB disk: time added over qemu-img create -b",
                   f"{ms(('vmtask', gib)):.0f} ms", f"bare {ms(('bare', gib)):.0f} ms",
                   f"+{added[gib] * 1000:.0f} ms", f"<= +{TARGET_ADDED_S * 1000:.0f} ms",
                   added[gib] <= TARGET_ADDED_S)


if __name__ == "__main__":
    main()
