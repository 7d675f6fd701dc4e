"""The text of the Lua scripts that change records atomically, from ``lua/*.lua``.

Each script is one transition, so every change of a record costs one round trip
and is never seen half-done.  They are run only through the registry,
`api.scripts.Scripts` (which says how to add one).
Lua has no includes: a script whose first lines say ``-- uses: <name>`` gets
``lua/<name>.lua`` (a ``local function``) put in front of it.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

USES = "-- uses: "


@cache
def load(name: str) -> str:
    text = resources.files(__package__).joinpath("lua", f"{name}.lua").read_text("utf-8")
    used = [line.removeprefix(USES).strip() for line in text.splitlines()
            if line.startswith(USES)]
    return "".join(load(library) + "\n" for library in used) + text
