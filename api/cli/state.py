"""The state shared by the command tree (`CliState`) and the flags every verb takes.

``--json`` and ``--no-wait`` set fields of the one `CliState`, the click context's
``obj``, so a flag given before the verb and the same flag after it mean the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import click

from api import errors
from api.server import VirtualServer


@dataclass
class CliState:
    """The root options, the output flags and the one `VirtualServer` of a run.

    It is the click context's ``obj``, shared by every level of the tree, so the
    error handler at the root knows whether ``--json`` was asked for below it.
    """

    url: str | None = None
    host: str | None = None
    json: bool = False
    no_wait: bool = False
    _server: VirtualServer | None = field(default=None, repr=False)

    def server(self) -> VirtualServer:
        if self._server is None:
            self._server = VirtualServer(self.url, self.host)
        return self._server

    def close(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            try:
                server.close()
            except errors.VMTaskError:
                pass  # closing a connection to a Redis that went away is not an error


def state_of(ctx: click.Context) -> CliState:
    return ctx.ensure_object(CliState)


def _flag_setter(name: str) -> Callable[[click.Context, click.Parameter, bool], bool]:
    def callback(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
        # Only ever set: "--json" before the verb must survive the verb's own default.
        if value:
            setattr(state_of(ctx), name, True)
        return value
    return callback


# Eager, so the flag is known even when a later parameter fails to parse.
json_option = click.option(
    "--json", "as_json", is_flag=True, expose_value=False, is_eager=True,
    callback=_flag_setter("json"),
    help="Print one JSON document on stdout; progress and errors stay on stderr.")
no_wait_option = click.option(
    "--no-wait", is_flag=True, expose_value=False, callback=_flag_setter("no_wait"),
    help="Print the task id and return at once; follow it later with 'task wait'.")
