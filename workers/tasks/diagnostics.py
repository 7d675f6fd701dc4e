"""The diagnostic operation behind `VirtualServer.ping`, for health checks and benchmarks."""

from __future__ import annotations

from api.protocol import tasks
from workers.runtime import TaskRun, operation


@operation(tasks.PING)
def ping(run: TaskRun, duration_ms: int = 0, steps: int = 0) -> dict[str, int]:
    if steps <= 0:
        if duration_ms:
            run.sleep(duration_ms / 1000)
        return {"steps": 0}
    for step in range(1, steps + 1):
        run.sleep(duration_ms / 1000 / steps)
        run.report_progress(step * 100 / steps)
        run.log(f"step {step}/{steps}")
    return {"steps": steps}
