"""One local Ray cluster for the distributed tests, shut down cleanly at the end.

vLLM engines started in their own processes (``LLM``'s engine core, ``vllm serve``) join it
through ``RAY_ADDRESS``; Ray Serve runs on it from this process. Teardown checks that every
process the cluster ran (Ray's own, Serve's replicas, their vLLM engine cores) is gone.
"""

from __future__ import annotations

import os
import time

import psutil
import pytest
import ray

from tests.serving.server import free_port


class LocalRayCluster:
    def __init__(self, metrics_port: int):
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self._processes: dict[int, psutil.Process] = {}

    def track_processes(self) -> None:
        """Remember this process's descendants now (a process orphaned later is out of the tree)."""
        me = psutil.Process()
        for proc in me.children(recursive=True):
            try:
                if proc.ppid() == me.pid and "multiprocessing.resource_tracker" in " ".join(proc.cmdline()):
                    continue  # this process's own helper (from spawning engine cores); it ends with us
            except psutil.NoSuchProcess:
                continue
            self._processes.setdefault(proc.pid, proc)

    def left_running(self) -> list[str]:
        alive = []
        for proc in self._processes.values():
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
            except psutil.NoSuchProcess:
                pass
        return alive


@pytest.fixture(scope="package")
def ray_cluster():
    metrics_port = free_port()
    # Logical CPUs: Ray Serve's controller, proxy, ingress and replicas each hold some; the
    # engines' CPU threads are set by vLLM, not by this count.
    ray.init(num_cpus=8, include_dashboard=False, _metrics_export_port=metrics_port)
    previous = os.environ.get("RAY_ADDRESS")
    # Engine cores run in their own processes and must join this cluster, not start another.
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    cluster = LocalRayCluster(metrics_port)
    yield cluster
    cluster.track_processes()
    ray.shutdown()
    if previous is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = previous
    deadline = time.time() + 60
    while cluster.left_running() and time.time() < deadline:
        time.sleep(1)
    assert cluster.left_running() == [], "processes outlived ray.shutdown()"
