"""The ``exporter`` verb: Prometheus metrics on ``/metrics``, read from Redis alone."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import click

from api.cli.state import state_of
from api.settings import Settings

DEFAULT_LISTEN = "127.0.0.1:9808"


def _check_listen(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    address, sep, port = value.rpartition(":")
    if not sep or not address or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter(f"must be ADDR:PORT, not {value!r}")
    return value


@click.command()
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, callback=_check_listen,
              help="Address and port of the HTTP server (ADDR:PORT).")
@click.pass_context
def exporter(ctx: click.Context, listen: str) -> None:
    """Serve Prometheus metrics on http://ADDR:PORT/metrics, read from Redis alone.

    Runs on any machine that reaches Redis (a sentinel:// URL too).  A scrape that
    cannot read Redis serves vmtask_up 0 and logs why; the next one tries again.
    """
    try:
        from api.exporter import serve
    except ImportError as exc:
        raise click.ClickException(
            f"the exporter needs prometheus_client ({exc}): pip install 'vmtask[exporter]'"
        ) from None
    env = {k: v for k, v in os.environ.items() if k != "VMTASK_HOST"}
    url = state_of(ctx).url
    settings = Settings.from_env({**env, "VMTASK_REDIS_URL": url} if url else env)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stop = threading.Event()

    def stop_serving(_signum: int, _frame: Any) -> None:
        stop.set()

    # docker stop sends SIGTERM: close the listening socket and exit 0.
    signal.signal(signal.SIGTERM, stop_serving)
    serve(settings.endpoint, listen, settings.redis_timeout_seconds, stop)
