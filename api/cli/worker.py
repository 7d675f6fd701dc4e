"""The ``worker`` and ``demo`` verbs: processes of the worker side, started by exec.

The producer package `api` never imports `workers`: each verb builds a command line
(and, for a worker, its environment) and replaces this process with it, so the
worker keeps this process's pid and a person's Ctrl-C reaches it directly.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

import click

from api.cli.state import json_option, state_of


def exec_python(args: list[str], env: Mapping[str, str] | None = None) -> NoReturn:
    """Replace this process with ``python ARGS`` (this interpreter), keeping its pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *args], dict(os.environ if env is None else env))


def worker_environment(base: Mapping[str, str], host: str, storage_root: Path,
                       url: str | None) -> dict[str, str]:
    """A copy of BASE with the ``VMTASK_*`` settings the worker reads at import."""
    env = dict(base)
    env["VMTASK_HOST"] = host
    env["VMTASK_STORAGE_ROOT"] = str(storage_root.absolute())
    if url:
        env["VMTASK_REDIS_URL"] = url
    return env


def worker_arguments(host: str, concurrency: int | None, loglevel: str) -> list[str]:
    """``-m celery -A workers worker ...``: the worker's command line, after the interpreter.

    Without ``concurrency`` the worker runs ``VMTASK_CONCURRENCY`` long operations.
    """
    slots = [] if concurrency is None else ["-c", str(concurrency)]
    return ["-m", "celery", "-A", "workers", "worker", "--loglevel", loglevel, *slots,
            "-n", f"vmtask-{host}@%h"]


@click.command()
@click.option("--host", "worker_host", envvar="VMTASK_HOST", required=True,
              help="The host this worker serves (queue host.<NAME>).")
@click.option("--storage-root", envvar="VMTASK_STORAGE_ROOT", default="./var/storage",
              type=click.Path(file_okay=False, path_type=Path), show_default=True)
@click.option("--concurrency", "-c", default=None, type=click.IntRange(1, 64),
              help="Long operations run at once (default: VMTASK_CONCURRENCY, else 4).")
@click.option("--loglevel", default="INFO", show_default=True)
@click.pass_context
def worker(ctx: click.Context, worker_host: str, storage_root: Path, concurrency: int | None,
           loglevel: str) -> None:
    """Run a worker for one host: the same as `celery -A workers worker`."""
    env = worker_environment(os.environ, worker_host, storage_root, state_of(ctx).url)
    exec_python(worker_arguments(worker_host, concurrency, loglevel), env)


@click.command()
@click.option("--workdir", default="./var/demo", show_default=True,
              type=click.Path(file_okay=False, path_type=Path))
@json_option
@click.pass_context
def demo(ctx: click.Context, workdir: Path) -> None:
    """Start Redis (unless VMTASK_REDIS_URL is set) and a worker, run operations, clean up."""
    as_json = ["--json"] if state_of(ctx).json else []
    exec_python(["-m", "workers.devtools.demo", "--workdir", str(workdir.absolute()), *as_json])
