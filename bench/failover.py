"""What Redis high availability costs and what a failover looks like to a producer.

One Sentinel cluster (a primary, a replica, three sentinels) on this machine:

1. Replica acknowledgement: the submit latency and the full round trip (submit ->
   wait_for_completion of vmtask.ping) with ``VMTASK_REDIS_WAIT_REPLICAS=1`` (every
   submit, start and result waits for the replica: WAIT) against ``=0`` (the plain
   primary), producer and worker alike, in the same run on the same cluster.
2. The failover: a producer submits without pause while the primary is killed with
   SIGKILL; prints the longest submit (the producer-visible outage), how many
   submits were refused, and that every accepted task ended once with Success.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api import VirtualServer, VMTaskResult, errors
from api.protocol import keys, tasks
from workers.devtools.sandbox import SentinelCluster, WorkerProcess

ROUNDS = 200


def median_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1000


def producer(url: str, acks: int) -> VirtualServer:
    os.environ["VMTASK_REDIS_WAIT_REPLICAS"] = str(acks)
    try:
        return VirtualServer(url, poll_interval=0.2)
    finally:
        del os.environ["VMTASK_REDIS_WAIT_REPLICAS"]


def measure(server: VirtualServer, host: str) -> tuple[list[float], list[float]]:
    submits, trips = [], []
    for _ in range(ROUNDS):
        begun = time.perf_counter()
        task = server.submit(tasks.PING, description="bench", host=host, kwargs={})
        submits.append(time.perf_counter() - begun)
        assert task.wait_for_completion(30_000)
        trips.append(time.perf_counter() - begun)
    return submits, trips


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="vmtask-bench-ha-") as tmp:
        root = Path(tmp)
        cluster = SentinelCluster(root / "cluster").start()
        workers = [
            WorkerProcess(cluster.url, "acked", root / "s1", root, concurrency=2,
                          env={"VMTASK_REDIS_WAIT_REPLICAS": "1"}),
            WorkerProcess(cluster.url, "plain", root / "s2", root, concurrency=2,
                          env={"VMTASK_REDIS_WAIT_REPLICAS": "0"}),
        ]
        try:
            for worker in workers:
                worker.start()
            acked, plain = producer(cluster.url, 1), producer(cluster.url, 0)
            for server, host in ((acked, "acked"), (plain, "plain")):
                measure(server, host)  # warm-up
            results = {}
            for server, host in ((plain, "plain"), (acked, "acked"), (plain, "plain2"),
                                 (acked, "acked2")):
                results[host] = measure(server, host.rstrip("2"))
            for name in ("plain", "acked"):
                submits = results[name][0] + results[name + "2"][0]
                trips = results[name][1] + results[name + "2"][1]
                print(f"{name:6} submit median {median_ms(submits):6.2f} ms   "
                      f"round trip median {median_ms(trips):6.2f} ms   ({len(trips)} tasks)")
            ratio = (median_ms(results["acked"][1] + results["acked2"][1])
                     / median_ms(results["plain"][1] + results["plain2"][1]))
            print(f"replica acknowledgement: round trip x{ratio:.2f} of the plain primary")

            accepted, refused, latencies = [], 0, []
            stop = threading.Event()

            def submit_forever() -> None:
                nonlocal refused
                while not stop.is_set():
                    begun = time.perf_counter()
                    try:
                        accepted.append(acked.submit(tasks.PING, description="ha",
                                                     host="acked", kwargs={}))
                    except errors.BrokerUnavailableError:
                        refused += 1
                    latencies.append((begun, time.perf_counter() - begun))

            thread = threading.Thread(target=submit_forever)
            thread.start()
            time.sleep(1.0)
            killed_at = time.perf_counter()
            old = cluster.kill_primary()
            cluster.wait_failover(old.port)
            promoted = time.perf_counter() - killed_at
            time.sleep(2.0)
            stop.set()
            thread.join()
            worst = max(latencies, key=lambda item: item[1])
            print(f"failover: primary killed, replica promoted after {promoted:.2f} s; "
                  f"longest submit {worst[1] * 1000:.0f} ms (started "
                  f"{(worst[0] - killed_at) * 1000:+.0f} ms from the kill); "
                  f"{len(accepted)} accepted, {refused} refused")
            client = cluster.primary().client()
            # A message taken but not started when the primary died comes back after
            # the visibility timeout (30 s) plus up to 10 s.
            deadline = time.monotonic() + 60
            ended, runs, stuck = 0, [], []
            for task in accepted:
                left = max(0.0, deadline - time.monotonic())
                if task.wait_for_completion(int(left * 1000)) and \
                        task.snapshot().result is VMTaskResult.Success:
                    ended += 1
                else:
                    stuck.append(client.hget(keys.task_record(task.id), "state"))
                runs.append(client.hget(keys.task_record(task.id), "runs"))
            print(f"accepted tasks ended Success: {ended} of {len(accepted)}; "
                  f"not ended (record state): {stuck}; "
                  f"ran more than once: {sum(1 for r in runs if r not in (None, '1'))}")
            acked.close()
            plain.close()
        finally:
            for worker in workers:
                worker.stop()
            cluster.stop()


if __name__ == "__main__":
    main()
