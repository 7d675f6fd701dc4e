"""Live migration of a running guest between two hosts, through vmtask against the same
QMP sequence driven directly (workers.engines.qemu_vm.livemigrate with no queue), in
one run.

Two workers (hosts ``a`` and ``b``, separate storage roots) on one machine.  Each
side has its own tiny guest (TCG, BENCH_MIGRATE_MB of RAM, default 256) with a qcow2
disk of BENCH_MIGRATE_DISK_MB (default 1024) holding BENCH_MIGRATE_DATA_MB of data
(default 256).  A round migrates each side's guest once to the other host (so the
guests go back and forth), alternating which side goes first.  The direct side does
everything the tasks do: create the destination disk, start the paused destination,
mirror, migrate, cancel the mirrors, run the guest there, stop the source and remove
its files.  Prints median times, the median of per-round ratios and QEMU's downtime
(``query-migrate``); targets: ratio <= 1.2x, downtime <= 300 ms.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("VMTASK_ACCEL", "tcg")

from api import VirtualServer, VMTaskResult
from bench.common import ROUNDS, record_row, verdict
from workers.devtools.sandbox import RedisServer, WorkerProcess
from workers.devtools.tinyguest import build_tiny_guest
from workers.engines import qemu_vm
from workers.engines.context import NullContext
from workers.engines.qemu_vm import livemigrate
from workers.engines.qemu_vm.process import force_stop

MEMORY_MB = int(os.environ.get("BENCH_MIGRATE_MB", "256"))
DISK_MB = int(os.environ.get("BENCH_MIGRATE_DISK_MB", "1024"))
DATA_MB = int(os.environ.get("BENCH_MIGRATE_DATA_MB", "256"))
PORTS = (49152, 49407)
APPEND = "console=ttyS0 quiet panic=-1"


def make_disk(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{DISK_MB}M"],
                   check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {DATA_MB}M", str(path)],
                   check=True, capture_output=True)


def add_guest(root: Path) -> None:
    guest = build_tiny_guest()
    (root / "guest").mkdir(parents=True, exist_ok=True)
    shutil.copy(guest.kernel, root / "guest" / "vmlinuz")
    shutil.copy(guest.initrd, root / "guest" / "initrd.gz")


class Direct:
    """One guest moved between two roots with the engine alone."""

    def __init__(self, tmp: Path) -> None:
        self.roots = [tmp / "da", tmp / "db"]
        self.here = 0
        for root in self.roots:
            add_guest(root)
        make_disk(self.roots[0] / "disk" / "d.qcow2")
        qemu_vm.start(self.config(0), self.paths(0), NullContext())

    def config(self, side: int) -> qemu_vm.VMConfig:
        root = self.roots[side]
        return qemu_vm.VMConfig(
            name="direct", memory_mb=MEMORY_MB, accel="tcg",
            disks=[str(root / "disk" / "d.qcow2")], kernel=str(root / "guest/vmlinuz"),
            initrd=str(root / "guest/initrd.gz"), append=APPEND, network=None)

    def paths(self, side: int) -> qemu_vm.VMPaths:
        return qemu_vm.VMPaths.for_vm(self.roots[side], "direct")

    def migrate(self) -> tuple[int, int]:
        """Move the guest to the other root; QEMU's downtime and the guest's pause, ms."""
        source, target = self.here, 1 - self.here
        context = NullContext()
        final_disk = self.roots[target] / "disk" / "d.qcow2"
        final_disk.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(final_disk),
                        f"{DISK_MB}M"], check=True)
        incoming = livemigrate.start_incoming(
            self.config(target), self.paths(target), context, address="127.0.0.1",
            ports=PORTS, exports=(livemigrate.new_export_name(),))
        deadline = time.monotonic() + 600
        with qemu_vm.connect(self.paths(source)) as monitor:
            outgoing = livemigrate.Outgoing.begin(monitor, self.config(source), context)
            outgoing.mirror(incoming)
            outgoing.wait_ready(context, lambda: None, deadline)
            final = outgoing.migrate(incoming, context, lambda: None, deadline)
            stopped = time.monotonic()
            outgoing.finish_mirrors(deadline)
            with qemu_vm.connect(self.paths(target)) as there:
                livemigrate.stop_serving(there)
                livemigrate.run_guest(there, run=True)
            handoff = time.monotonic() - stopped
        qemu_vm.turn_off(self.paths(source))
        (self.roots[source] / "disk" / "d.qcow2").unlink()
        shutil.rmtree(self.paths(source).directory)
        self.here = target
        downtime = int(final["downtime"])
        return downtime, downtime + round(handoff * 1000)

    def stop(self) -> None:
        for side in (0, 1):
            qemu_vm.turn_off(self.paths(side))


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="vmm-", dir="/tmp") as t:
        tmp = Path(t)
        redis = RedisServer(tmp / "redis").start()
        workers = [WorkerProcess(redis.url, host, tmp / host, tmp, concurrency=2, include=())
                   for host in ("a", "b")]
        times: dict[str, list[float]] = {"vmtask": [], "direct": []}
        downtimes: dict[str, list[int]] = {"vmtask": [], "direct": []}
        pauses: dict[str, list[int]] = {"vmtask": [], "direct": []}
        direct: Direct | None = None
        try:
            for worker in workers:
                worker.start(wait=False)
                add_guest(worker.storage_root)
            for worker in workers:
                worker.wait_ready()
            make_disk(tmp / "a" / "disk" / "d.qcow2")
            server = VirtualServer(redis.url, host="a", poll_interval=0.5)
            vm = server.create_virtual_machine(
                "queued", memory_mb=MEMORY_MB, disks=["disk/d.qcow2"], network=None,
                kernel="guest/vmlinuz", initrd="guest/initrd.gz", append=APPEND)

            def run(task: object) -> dict[str, object]:
                assert task.wait_for_completion(-1)  # type: ignore[attr-defined]
                snap = task.snapshot()  # type: ignore[attr-defined]
                assert snap.result is VMTaskResult.Success, snap.error_description
                return snap.output or {}

            run(vm.startup())
            direct = Direct(tmp)
            time.sleep(3)  # both guests past their boot

            def queued_round() -> None:
                vm.state  # noqa: B018 - refreshes the VM's host
                target = "b" if vm.host == "a" else "a"
                started = time.perf_counter()
                output = run(vm.migrate(target))
                times["vmtask"].append(time.perf_counter() - started)
                downtimes["vmtask"].append(int(output["downtime_ms"]))  # type: ignore[call-overload]
                pauses["vmtask"].append(int(output["paused_ms"]))  # type: ignore[call-overload]

            def direct_round() -> None:
                assert direct is not None
                started = time.perf_counter()
                downtime, paused = direct.migrate()
                downtimes["direct"].append(downtime)
                pauses["direct"].append(paused)
                times["direct"].append(time.perf_counter() - started)

            for n in range(ROUNDS):
                first, second = (direct_round, queued_round) if n % 2 == 0 else (
                    queued_round, direct_round)
                first()
                second()
            vm.state  # noqa: B018 - refreshes the VM's host
            run(vm.turn_off())
            run(vm.delete())
        finally:
            if direct is not None:
                direct.stop()
            for worker in workers:
                worker.stop()
                # QEMU outlives its worker: a round that failed leaves the queued guest.
                force_stop(qemu_vm.VMPaths.for_vm(worker.storage_root, "queued"))
            redis.stop()
    ratios = [q / d for q, d in zip(times["vmtask"], times["direct"], strict=True)]
    r = statistics.median(ratios)
    q, d = statistics.median(times["vmtask"]), statistics.median(times["direct"])
    down_q, down_d = statistics.median(downtimes["vmtask"]), statistics.median(downtimes["direct"])
    worst = max(downtimes["vmtask"])
    pause_q, pause_d = statistics.median(pauses["vmtask"]), statistics.median(pauses["direct"])
    print(f"{MEMORY_MB} MB tiny guest, {DISK_MB} MB qcow2 disk with {DATA_MB} MB of data, "
          f"TCG, median of {ROUNDS} alternating rounds:")
    print(f"  total     direct {d * 1000:7.1f} ms   vmtask {q * 1000:7.1f} ms   "
          f"ratio {r:5.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f})  "
          f"target <= 1.2x ({verdict(r <= 1.2)})")
    print(f"  downtime  direct {down_d:7.1f} ms   vmtask {down_q:7.1f} ms   "
          f"(vmtask worst {worst} ms)  target <= 300 ms ({verdict(down_q <= 300)})")
    print(f"  paused    direct {pause_d:7.1f} ms   vmtask {pause_q:7.1f} ms   "
          f"(vmtask worst {max(pauses['vmtask'])} ms; QEMU's downtime plus the switch-over "
          f"until the destination's cont)")
    record_row(f"live migration, {MEMORY_MB} MB guest + {DISK_MB} MB disk",
               f"{q * 1000:.0f} ms", f"direct QMP {d * 1000:.0f} ms",
               f"{r:.2f}x ({min(ratios):.2f}-{max(ratios):.2f})", "<= 1.2x", r <= 1.2)
    record_row("live migration downtime (query-migrate)", f"{down_q:.0f} ms",
               f"direct QMP {down_d:.0f} ms", "", "<= 300 ms", down_q <= 300)
    record_row("live migration guest pause (downtime + switch-over)", f"{pause_q:.0f} ms",
               f"direct QMP {pause_d:.0f} ms", "", "", None)


if __name__ == "__main__":
    main()
