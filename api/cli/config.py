"""The ``config`` verb: the settings in effect, as a producer or worker here reads them.

Values come from `Settings.from_env` (with the root ``--url`` and ``--host``), so a
bad value fails here as it would at a worker's start.  Secrets never reach the
output: a password in the Redis URL is shown as ``***``, and a password file by its
path (its contents are read only to check them, as every client does).
"""

from __future__ import annotations

import os

import click
from rich.table import Column

from api.cli.output import emit_json, new_table, stdout_console
from api.cli.state import json_option, state_of
from api.settings import Settings, configuration_page, effective, unknown_variables


@click.command()
@click.option("--markdown", is_flag=True,
              help="Print the configuration page (every variable, its meaning and default) "
                   "instead: docs/operations/configuration.md.")
@json_option
@click.pass_context
def config(ctx: click.Context, markdown: bool) -> None:
    """The VMTASK_* settings in effect, secrets redacted; unknown VMTASK_* variables."""
    if markdown:
        click.echo(configuration_page(), nl=False)
        return
    state = state_of(ctx)
    env = dict(os.environ)
    for name, value in (("VMTASK_REDIS_URL", state.url), ("VMTASK_HOST", state.host)):
        if value:
            env[name] = value
    shown = effective(Settings.from_env(env))
    unknown = unknown_variables(env)
    if state.json:
        emit_json({
            "settings": [{"variable": name, "value": value, "set": bool(env.get(name))}
                         for name, value in shown.items()],
            "unknown": [{"variable": name, "closest": closest} for name, closest in unknown],
        })
        return
    table = new_table(Column("variable", no_wrap=True), Column("value", overflow="fold"),
                      Column("from", no_wrap=True))
    for name, value in shown.items():
        table.add_row(name, value or "-", "environment" if env.get(name) else "default")
    console = stdout_console()
    console.print(table)
    for name, closest in unknown:
        hint = f"; did you mean {closest}?" if closest else ""
        console.print(f"unknown: {name} is not a vmtask setting and is ignored{hint}")
