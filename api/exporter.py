"""Prometheus metrics from Redis alone: ``vmtask exporter --listen ADDR:PORT``.

Everything comes from Redis, so the exporter runs on any machine that reaches it
(Sentinel URLs too).  A scrape is two pipelined round trips whatever the history:

1. the metrics hash (counters and histogram buckets that `lua/task_metrics.lua`
   adds to as each task ends), the known hosts, the VM names and the running set;
2. each known host's heartbeat and queue lengths, each VM's host and state, and
   each running task's host and state.

Its size follows the hosts, VMs and running tasks, never the finished tasks.  A
scrape that cannot read Redis (a restart, a failover) serves ``vmtask_up 0`` and
logs why; the next scrape connects again.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
from prometheus_client import start_http_server
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from redis.backoff import NoBackoff
from redis.retry import Retry

from api.connection import RedisEndpoint
from api.enums import VMTaskResult, VMVMState
from api.protocol import keys
from api.protocol.backups import LAST_BACKUP_FIELD
from api.protocol.records import STARTED, Field

log = logging.getLogger(__name__)

# Upper bounds (seconds) of the duration and queue-wait buckets: from a ping to a
# many-hour copy.  The same list is in `lua/task_metrics.lua` (a test checks).
BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
                              300, 600, 1800, 3600, 7200, 21600)
LANES = {"long": keys.host_queue, "control": keys.control_queue}
HISTOGRAMS = {
    "duration": ("vmtask_task_duration_seconds",
                 "Time from a task's start to its end, by operation and host"),
    "wait": ("vmtask_task_queue_wait_seconds",
             "Time a task waited in its host's queue before it started"),
}


@dataclass
class Histogram:
    buckets: dict[float, int] = field(default_factory=dict)  # per bucket, not cumulative
    total: float = 0.0

    def cumulative(self) -> list[tuple[str, float]]:
        running, out = 0, []
        for bound in (*BUCKETS, math.inf):
            running += self.buckets.get(bound, 0)
            out.append(("+Inf" if bound == math.inf else repr(float(bound)), float(running)))
        return out


@dataclass
class Reading:
    """What one scrape read from Redis."""

    tasks_total: dict[tuple[str, str, str], int]
    histograms: dict[str, dict[tuple[str, str], Histogram]]
    hosts: list[str]
    heartbeats: dict[str, dict[str, Any] | None]
    queues: dict[tuple[str, str], int]
    vms: dict[tuple[str, str], int]
    running: dict[str, int]
    maintenance: frozenset[str] = frozenset()
    backups: dict[str, float] = field(default_factory=dict)
    """Each VM's last successful backup (epoch s), from its record."""


def result_name(value: str) -> str:
    try:
        return VMTaskResult(int(value)).name
    except ValueError:
        return value


def parse_metrics_hash(raw: dict[str, str]) -> tuple[
        dict[tuple[str, str, str], int], dict[str, dict[tuple[str, str], Histogram]]]:
    """The counters and histograms of the hash `lua/task_metrics.lua` keeps."""
    totals: dict[tuple[str, str, str], int] = {}
    histograms: dict[str, dict[tuple[str, str], Histogram]] = {k: {} for k in HISTOGRAMS}
    for name, value in raw.items():
        parts = name.split("\t")
        try:
            if parts[0] == "total" and len(parts) == 4:
                labels = (parts[1], parts[2], result_name(parts[3]))
                totals[labels] = totals.get(labels, 0) + int(value)
            elif parts[0] == "bucket" and len(parts) == 5 and parts[1] in histograms:
                bound = math.inf if parts[4] == "+Inf" else float(parts[4])
                histogram = histograms[parts[1]].setdefault((parts[2], parts[3]), Histogram())
                histogram.buckets[bound] = histogram.buckets.get(bound, 0) + int(value)
            elif parts[0] == "sum" and len(parts) == 4 and parts[1] in histograms:
                histograms[parts[1]].setdefault((parts[2], parts[3]), Histogram()).total = \
                    float(value)
        except ValueError:
            log.warning("Ignoring a malformed metrics field %r", name)
    return totals, histograms


def read(client: redis.Redis) -> Reading:
    """Everything a scrape shows, in two pipelined round trips (see the module's doc)."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.METRICS)
    pipe.smembers(keys.KNOWN_HOSTS)
    pipe.smembers(keys.VM_NAMES)
    pipe.smembers(keys.RUNNING_TASKS)
    pipe.hgetall(keys.MAINTENANCE)
    raw_metrics, known, vm_names, running_ids, held = pipe.execute()
    hosts, vm_names, running_ids = sorted(known), sorted(vm_names), sorted(running_ids)

    pipe = client.pipeline(transaction=False)
    if hosts:
        pipe.mget([keys.host_heartbeat(h) for h in hosts])
    for host in hosts:
        for queue in LANES.values():
            pipe.llen(queue(host))
    for name in vm_names:
        pipe.hmget(keys.vm_record(name), "host", "state", LAST_BACKUP_FIELD)
    for task_id in running_ids:
        pipe.hmget(keys.task_record(task_id), Field.HOST, Field.STATE)
    replies = iter(pipe.execute() if hosts or vm_names or running_ids else [])

    beats: dict[str, dict[str, Any] | None] = {}
    for host, raw in zip(hosts, next(replies) if hosts else [], strict=True):
        beats[host] = json.loads(raw) if raw else None
    queues = {(host, lane): int(next(replies)) for host in hosts for lane in LANES}
    vms: dict[tuple[str, str], int] = defaultdict(int)
    backups: dict[str, float] = {}
    for name in vm_names:
        host, state, last_backup = next(replies)
        if last_backup:
            backups[name] = float(last_backup)
        if host is None or state is None:
            continue  # deleted between the two round trips
        # As `VirtualMachine.state` reads it: Invalid while its host is down.
        shown = VMVMState(int(state)).name if beats.get(host) else VMVMState.Invalid.name
        vms[(host, shown)] += 1
    running: dict[str, int] = defaultdict(int)
    for _ in running_ids:
        host, state = next(replies)
        if state == STARTED and host is not None:
            running[host] += 1
    totals, histograms = parse_metrics_hash(raw_metrics)
    return Reading(totals, histograms, hosts, beats, queues, dict(vms), dict(running),
                   frozenset(held), backups)


def families(reading: Reading) -> Iterator[Metric]:
    """The metric families of one reading."""
    total = CounterMetricFamily("vmtask_tasks", "Tasks that ended, by operation, host and "
                                "VMTaskResult", labels=("operation", "host", "result"))
    for (operation, host, result), count in sorted(reading.tasks_total.items()):
        total.add_metric((operation, host, result), count)
    yield total
    for kind, (name, doc) in HISTOGRAMS.items():
        family = HistogramMetricFamily(name, doc, labels=("operation", "host"))
        for (operation, host), histogram in sorted(reading.histograms[kind].items()):
            family.add_metric((operation, host), histogram.cumulative(), histogram.total)
        yield family
    running = GaugeMetricFamily("vmtask_tasks_running", "Started, unfinished tasks per host",
                                labels=("host",))
    for host in sorted(set(reading.hosts) | set(reading.running)):
        running.add_metric((host,), reading.running.get(host, 0))
    yield running
    queued = GaugeMetricFamily("vmtask_queue_length", "Messages waiting in a host's queue: "
                               "lane long (host.<name>) or control (host.<name>.control)",
                               labels=("host", "lane"))
    for (host, lane), length in sorted(reading.queues.items()):
        queued.add_metric((host, lane), length)
    yield queued
    up = GaugeMetricFamily("vmtask_host_up", "1 while a worker's heartbeat for the host is "
                           "live", labels=("host",))
    maintenance = GaugeMetricFamily("vmtask_host_maintenance", "1 while the host is in "
                                    "maintenance (VirtualServer.set_maintenance)",
                                    labels=("host",))
    free = GaugeMetricFamily("vmtask_storage_free_bytes", "Free bytes in the host's storage "
                             "root, from its last heartbeat (live hosts only)", labels=("host",))
    for host in reading.hosts:
        beat = reading.heartbeats.get(host)
        up.add_metric((host,), 1 if beat else 0)
        maintenance.add_metric((host,), 1 if host in reading.maintenance else 0)
        if beat and isinstance(beat.get("storage_free_bytes"), int | float):
            free.add_metric((host,), beat["storage_free_bytes"])
    yield up
    yield maintenance
    yield free
    vms = GaugeMetricFamily("vmtask_vms", "VMs by host and VMVMState (Invalid while the "
                            "host is down, as VirtualMachine.state reads)",
                            labels=("host", "state"))
    for (host, state), count in sorted(reading.vms.items()):
        vms.add_metric((host, state), count)
    yield vms
    last_backup = GaugeMetricFamily("vmtask_backup_last_success_timestamp", "Unix time of "
                                    "the VM's last successful backup (VMs never backed up "
                                    "have no sample)", labels=("vm",))
    for vm, when in sorted(reading.backups.items()):
        last_backup.add_metric((vm,), when)
    yield last_backup


class VMTaskCollector(Collector):
    """Reads Redis on every scrape; ``vmtask_up`` says whether that worked."""

    def __init__(self, client: redis.Redis, where: str = "Redis") -> None:
        self.client = client
        self.where = where

    def collect(self) -> Iterable[Metric]:
        began = time.monotonic()
        error: Exception | None = None
        produced: list[Metric] = []
        try:
            produced = list(families(read(self.client)))
        except (redis.RedisError, OSError) as exc:
            error = exc
            log.error("Scrape failed: cannot read %s: %s", self.where, exc)
        except ValueError as exc:  # a record that is not what vmtask writes
            error = exc
            log.error("Scrape failed: unexpected data in %s: %s", self.where, exc)
        up = GaugeMetricFamily("vmtask_up", "1 if this scrape read Redis; 0 if it failed "
                               "(the error is in the exporter's log)")
        up.add_metric((), 0 if error else 1)
        took = GaugeMetricFamily("vmtask_scrape_duration_seconds",
                                 "How long this scrape took to read Redis")
        took.add_metric((), time.monotonic() - began)
        return [up, took, *produced]


def scrape_client(endpoint: RedisEndpoint, timeout: float) -> redis.Redis:
    """A client that fails a scrape quickly rather than retry through a whole
    failover (Prometheus gives up on a slow scrape anyway): one retry only, for a
    connection that died since the last scrape while Redis is back."""
    return endpoint.client(timeout, decode_responses=True, socket_keepalive=True,
                           retry=Retry(NoBackoff(), 1),
                           retry_on_error=[redis.ConnectionError, redis.TimeoutError])


def registry_for(client: redis.Redis, where: str = "Redis") -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(VMTaskCollector(client, where))
    return registry


def parse_listen(listen: str) -> tuple[str, int]:
    """``ADDR:PORT`` (``[v6]:PORT`` too) as (address, port); ValueError otherwise."""
    address, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not address:
        raise ValueError(f"--listen must be ADDR:PORT, not {listen!r}")
    return address.strip("[]"), int(port)


def serve(endpoint: RedisEndpoint, listen: str, timeout: float,
          stop: threading.Event | None = None) -> None:
    """Serve ``/metrics`` on ``listen`` until ``stop`` is set (or forever)."""
    address, port = parse_listen(listen)
    client = scrape_client(endpoint, timeout)
    server, thread = start_http_server(port, address, registry_for(client, endpoint.redacted))
    log.info("vmtask exporter on http://%s:%d/metrics, reading %s", address,
             server.server_port, endpoint.redacted)
    try:
        (stop or threading.Event()).wait()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        client.close()
