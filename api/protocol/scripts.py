"""The Lua scripts that change records atomically, loaded from ``lua/*.lua``.

Each script is one transition, run with EVALSHA (redis-py's `register_script`),
so every change of a record costs one round trip and is never seen half-done.
"""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def load(name: str) -> str:
    return resources.files(__package__).joinpath("lua", f"{name}.lua").read_text("utf-8")
