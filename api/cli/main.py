"""The root of the ``vmtask`` command: the click group, global options, error handling.

Every failure becomes one line on stderr (and, with ``--json``, an error document on
stdout) and an exit code from `EXIT_CODES`; never a traceback.  The verbs live in
their own modules and are added to the group here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from api import errors
from api.cli.backup import backup
from api.cli.config import config
from api.cli.disk import disk
from api.cli.exits import (
    EXIT_CODES,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    exit_code_for_error,
)
from api.cli.exporter import exporter
from api.cli.hosts import hosts, ping
from api.cli.output import emit_json, error_line, one_line
from api.cli.state import CliState, json_option, state_of
from api.cli.task import task, wait
from api.cli.vm import vm
from api.cli.vm_console import vm_console as _vm_console  # noqa: F401  (registers its verbs)
from api.cli.vm_snapshot import snapshot as _snapshot  # noqa: F401  (registers its verbs)
from api.cli.worker import demo, worker
from api.protocol import hresults
from api.protocol.hresults import format_hresult
from api.settings import Settings


def report_failure(state: CliState, kind: str, message: str, hresult: int, code: int) -> int:
    """One line on stderr; with --json, also the error as the JSON document on stdout."""
    error_line(message)
    if state.json:
        emit_json({"error": {"type": kind, "message": one_line(message), "hresult": hresult,
                             "hresult_hex": f"0x{hresult:08X}", "exit_code": code}})
    return code


def usage_failure(state: CliState, exc: click.UsageError) -> int:
    where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
    message = f"{exc.format_message()} [{format_hresult(hresults.E_INVALIDARG)}]{where}"
    return report_failure(state, "UsageError", message, hresults.E_INVALIDARG, EXIT_USAGE)


@contextmanager
def reported_errors(state: CliState) -> Iterator[None]:
    """Turn whatever the body raises into one line and its exit code; then close the server.

    Click's own exits, aborts and messages pass through (a usage error is reported
    here, with E_INVALIDARG), and so does SystemExit (a task's result code).
    """
    try:
        yield
    except (click.exceptions.Exit, click.exceptions.Abort, click.exceptions.NoArgsIsHelpError):
        raise
    except click.UsageError as exc:
        raise click.exceptions.Exit(usage_failure(state, exc)) from None
    except click.ClickException:
        raise
    except errors.VMTaskError as exc:
        code = exit_code_for_error(exc)
        raise click.exceptions.Exit(
            report_failure(state, type(exc).__name__, str(exc), exc.hresult, code)) from None
    except KeyboardInterrupt:
        click.echo("vmtask: interrupted", err=True)
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
    except Exception as exc:  # noqa: BLE001 - the contract: one line, never a traceback
        message = f"unexpected {type(exc).__name__}: {exc} " \
                  f"[{format_hresult(hresults.E_UNEXPECTED)}]"
        raise click.exceptions.Exit(report_failure(
            state, type(exc).__name__, message, hresults.E_UNEXPECTED, EXIT_ERROR)) from None
    finally:
        state.close()


class VMTaskCLI(click.Group):
    """Turns every failure into one line on stderr and an exit code (see `EXIT_CODES`)."""

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        state = extra.setdefault("obj", CliState())
        if parent is None:
            info_name = "vmtask"  # not "python -m api.cli" in messages
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            raise click.exceptions.Exit(usage_failure(state, exc)) from None

    def invoke(self, ctx: click.Context) -> Any:
        with reported_errors(state_of(ctx)):
            result = super().invoke(ctx)
        return result


def _check_url(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    # The library's own check, with what goes with the URL (the Sentinel master
    # name, TLS files, a password file) read from VMTASK_* as VirtualServer reads
    # them; reported as a usage error, whose line adds the HRESULT once.
    if value:
        try:
            env = {k: v for k, v in os.environ.items() if k != "VMTASK_HOST"}
            Settings.from_env({**env, "VMTASK_REDIS_URL": value})
        except errors.InvalidArgumentError as exc:
            raise click.BadParameter(exc.args[0]) from None
    return value


@click.group(cls=VMTaskCLI, context_settings={"help_option_names": ["-h", "--help"]},
             epilog="Exit codes: " + "; ".join(f"{c} {t}" for c, t in EXIT_CODES.items()))
@click.option("--url", envvar="VMTASK_REDIS_URL", default=None, callback=_check_url,
              help="Redis URL (env VMTASK_REDIS_URL; default redis://127.0.0.1:6379/0).")
@click.option("--host", envvar="VMTASK_HOST", default=None,
              help="Target worker host (env VMTASK_HOST; default: the only live host).")
@json_option
@click.pass_context
def main(ctx: click.Context, url: str | None, host: str | None) -> None:
    """vmtask: VM and disk operations as tracked, cancellable tasks.

    Long operations show a live progress bar; Ctrl-C offers to cancel the task.
    """
    state = state_of(ctx)
    state.url, state.host = url, host


for _command in (disk, vm, task, wait, hosts, ping, worker, demo, config, exporter, backup):
    main.add_command(_command)
