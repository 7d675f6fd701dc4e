"""TLS end to end: producer, worker and Flower against a redis-server that speaks only TLS.

The CA, the server certificate (127.0.0.1) and a client certificate are made in the
test with ``openssl``; the server listens on ``--tls-port`` only (``--port 0``)
and asks every client for a certificate.  Producer, worker and Flower get the
files through ``VMTASK_REDIS_CA`` / ``_CERT`` / ``_KEY`` or URL parameters.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api import VirtualServer, VMTaskResult, errors
from workers.devtools.sandbox import (
    RedisServer,
    TlsFiles,
    WorkerProcess,
    free_port,
    make_tls_files,
    stop_process_group,
    wait_until,
)

HOST = "tlshost"
CELERY = Path(sys.executable).parent / "celery"
AUTH = "ops:tls-flower-password"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls-files"))


@pytest.fixture(scope="module")
def cluster(tls: TlsFiles, tmp_path_factory: pytest.TempPathFactory,
            ) -> Iterator[tuple[RedisServer, WorkerProcess, int]]:
    root = tmp_path_factory.mktemp("tls")
    redis_server = RedisServer(root / "redis", tls=tls).start()
    worker: WorkerProcess | None = None
    flower: subprocess.Popen[bytes] | None = None
    try:
        # The TLS page's plain rediss:// URL, with the CA and client certificate as variables.
        worker = WorkerProcess(redis_server.url, HOST, root / "storage", root,
                               env=tls.client_env()).start()
        port = free_port()
        env = {**worker.environment(), "FLOWER_BASIC_AUTH": AUTH}
        with (root / "flower.log").open("wb") as log:
            flower = subprocess.Popen(
                [str(CELERY), "-A", "workers", "flower", f"--port={port}",
                 "--address=127.0.0.1"],
                cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: flower_get(port, "/healthcheck") is not None, 30, "flower")
        yield redis_server, worker, port
    finally:
        if flower is not None:
            stop_process_group(flower)
        if worker is not None:
            worker.stop()
        redis_server.stop()


def flower_get(port: int, path: str) -> Any:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    request.add_header("Authorization", "Basic " + base64.b64encode(AUTH.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read().decode()
    except OSError:
        return None
    return json.loads(body) if path.startswith("/api") else body


def run_tasks(server: VirtualServer, disk: str) -> None:
    ping = server.ping(duration_ms=100, steps=2)
    assert ping.wait_for_completion(30_000)
    assert ping.result == VMTaskResult.Success, ping.error_description
    create = server.create_dynamic_virtual_hard_disk(disk, 8)
    assert create.wait_for_completion(60_000)
    assert create.result == VMTaskResult.Success, create.error_description
    assert server.get_hard_disk(disk).size_in_guest == 8 * 1024 * 1024


def test_producer_and_worker_over_tls_with_variables(
    cluster: tuple[RedisServer, WorkerProcess, int], tls: TlsFiles,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    redis_server, _, _ = cluster
    for name, value in tls.client_env().items():
        monkeypatch.setenv(name, value)
    with VirtualServer(redis_server.url, host=HOST, poll_interval=0.5) as server:
        assert server.hosts == [HOST]
        run_tasks(server, "tls-a.qcow2")


def test_producer_over_tls_with_url_parameters_in_celerys_spelling(
    cluster: tuple[RedisServer, WorkerProcess, int], tls: TlsFiles,
) -> None:
    redis_server, _, _ = cluster
    url = (f"{redis_server.url}?ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs={tls.ca}"
           f"&ssl_certfile={tls.client_cert}&ssl_keyfile={tls.client_key}")
    with VirtualServer(url, host=HOST, poll_interval=0.5) as server:
        run_tasks(server, "tls-b.qcow2")


def test_flower_sees_the_worker_and_its_tasks_over_tls(
    cluster: tuple[RedisServer, WorkerProcess, int], tls: TlsFiles,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    redis_server, worker, port = cluster
    for name, value in tls.client_env().items():
        monkeypatch.setenv(name, value)

    def listed() -> bool:
        workers = flower_get(port, "/api/workers?refresh=1") or {}
        return any(name.startswith(f"{HOST}-") and info.get("active_queues")
                   for name, info in workers.items())

    # Flower sees only the events sent while it listens: it must be up first.
    wait_until(listed, 30, "Flower to list the worker over TLS", interval=0.5)
    with VirtualServer(redis_server.url, host=HOST, poll_interval=0.5) as server:
        task = server.ping(duration_ms=100)
        assert task.wait_for_completion(30_000)
    wait_until(lambda: task.id in (flower_get(port, "/api/tasks") or {}), 30,
               "Flower to show the task", interval=0.5)
    # The queue lengths come from Flower's own redis client (broker_use_ssl).
    queues = flower_get(port, "/api/queues/length")
    assert queues is not None and any(q["name"] == f"host.{HOST}"
                                      for q in queues["active_queues"]), queues
    assert worker.proc is not None and worker.proc.poll() is None


@pytest.mark.parametrize("how", ["wrong CA", "no client certificate", "system CAs"])
def test_a_failed_handshake_is_broker_unavailable_at_once(
    cluster: tuple[RedisServer, WorkerProcess, int], tls: TlsFiles, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, how: str,
) -> None:
    redis_server, _, _ = cluster
    for name in tls.client_env():
        monkeypatch.delenv(name, raising=False)
    if how == "wrong CA":
        other = make_tls_files(tmp_path, "other")
        for name, value in other.client_env().items():
            monkeypatch.setenv(name, value)
    elif how == "no client certificate":
        monkeypatch.setenv("VMTASK_REDIS_CA", str(tls.ca))
    started = time.monotonic()
    with pytest.raises(errors.BrokerUnavailableError):
        VirtualServer(redis_server.url, host=HOST).hosts  # noqa: B018
    assert time.monotonic() - started < 10
    with pytest.raises(errors.BrokerUnavailableError):
        VirtualServer(redis_server.url, host=HOST).ping()


def test_a_tls_url_against_a_plain_port_fails_in_bounded_time(
    redis_server: RedisServer, tls: TlsFiles, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VMTASK_REDIS_CA", str(tls.ca))
    monkeypatch.setenv("VMTASK_REDIS_TIMEOUT_SECONDS", "1")
    started = time.monotonic()
    with pytest.raises(errors.BrokerUnavailableError):
        VirtualServer(f"rediss://127.0.0.1:{redis_server.port}/0", host=HOST).hosts  # noqa: B018
    assert time.monotonic() - started < 10
