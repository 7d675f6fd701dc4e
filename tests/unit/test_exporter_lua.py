"""The exporter and `lua/task_metrics.lua` agree on the hash's name and the buckets."""

from __future__ import annotations

import re

from api.exporter import BUCKETS
from api.protocol import keys, scripts


def test_the_lua_and_the_exporter_share_the_key_and_the_buckets() -> None:
    lua = scripts.load("task_metrics")
    assert f"local METRICS = '{keys.METRICS}'" in lua
    table = re.search(r"local BUCKETS = \{([^}]*)\}", lua)
    assert table is not None
    assert tuple(float(b) for b in table.group(1).replace("\n", " ").split(",")) == BUCKETS
    assert list(BUCKETS) == sorted(BUCKETS)


def test_every_script_that_ends_a_task_counts_it() -> None:
    for name in ("task_finish", "task_cancel", "task_withdraw"):
        body = scripts.load(name)
        assert "local function task_metrics" in body, name
        # Called before the end is written: an error there leaves nothing half-done.
        assert body.index("task_metrics(KEYS[1]") < body.index("'state', 'REVOKED'") \
            if name != "task_finish" else \
            body.index("task_metrics(KEYS[1]") < body.index("'state', ARGV[1]"), name
