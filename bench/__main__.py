"""Run every benchmark, one after another, and print the table of docs/benchmarks.md.

    .venv/bin/python -m bench                 # all of them
    .venv/bin/python -m bench round_trip enqueue   # some of them

Each script runs in a process of its own (its output is shown as it goes) and
appends its rows to a file named by BENCH_ROWS_FILE; the table is printed at the
end in markdown.  Run it on an otherwise idle machine: the benchmarks compare
processes that share its cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["commands", "round_trip", "throughput", "enqueue", "status", "backlog", "convert",
           "vm_save_restore", "control_latency", "migrate", "exporter", "scale",
           "linked_clone", "task_log", "live_snapshot",
           "clone_remote", "evacuate", "backup", "aio"]


def main(names: list[str]) -> int:
    unknown = [n for n in names if n not in SCRIPTS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {SCRIPTS}", file=sys.stderr)
        return 2
    failed: list[str] = []
    with tempfile.NamedTemporaryFile("r", prefix="bench-rows-", suffix=".jsonl") as rows:
        env = {**os.environ, "BENCH_ROWS_FILE": rows.name, "PYTHONPATH": str(ROOT)}
        for name in names or SCRIPTS:
            print(f"\n== bench/{name}.py", flush=True)
            if subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py")],
                              cwd=ROOT, env=env).returncode != 0:
                failed.append(name)
        table = [json.loads(line) for line in rows.read().splitlines() if line.strip()]
    print("\n| benchmark | vmtask | baseline | ratio | target | met? |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in table:
        met = "" if row["met"] is None else ("yes" if row["met"] else "**no**")
        print(f"| {row['row']} | {row['vmtask']} | {row['baseline']} | {row['ratio']} | "
              f"{row['target']} | {met} |")
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
