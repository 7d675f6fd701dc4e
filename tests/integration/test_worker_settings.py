"""A real worker's start-up reading of the ``VMTASK_*`` environment."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from workers.devtools.sandbox import RedisServer, WorkerProcess


def test_a_worker_warns_at_start_about_a_misspelt_variable_without_its_value(
        spawn: Callable[..., Any]) -> None:
    redis_server: RedisServer = spawn("redis")
    worker: WorkerProcess = spawn(
        "worker", redis_url=redis_server.url, host="typo", concurrency=1,
        env={"VMTASK_REDIS_TIMOUT_SECONDS": "3", "VMTASK_REDIS_PASWORD": "pw-Value4"})
    log = worker.log()  # the warning comes before the worker is ready
    assert "VMTASK_REDIS_TIMOUT_SECONDS is not a vmtask setting and is ignored; did you " \
           "mean VMTASK_REDIS_TIMEOUT_SECONDS?" in log, log
    assert "VMTASK_REDIS_PASWORD is not a vmtask setting" in log, log
    assert "pw-Value4" not in log
    assert "WARNING" in log.split("VMTASK_REDIS_TIMOUT_SECONDS")[0].splitlines()[-1]
