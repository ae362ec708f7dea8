"""Let vLLM's Ray executor (V2) start CPU workers.

Target: ``vllm.v1.executor.ray_executor_v2.RayExecutorV2._get_actor_resource_kwargs`` and
``RayWorkerProc.get_node_and_physical_gpu_ids``.
Why: with ``CpuPlatform.ray_device_key = "CPU"`` (``engine_patches.cpu_platform``) the executor
asks Ray for actors with ``resources={"CPU": 1}``, which Ray rejects (CPU is requested with
``num_cpus``), and asks each worker for its accelerator ids, which CPU workers do not have.
How: for the CPU key, actors ask for no GPU and no custom resource (the placement group's CPU
bundle already reserves their core), and a worker reports its node with no device ids. Other
platforms take the original methods.
Upstream PR: none; removable together with ``cpu_platform`` when vLLM supports Ray on CPU.
Drift guard: raises at apply time if either method is gone;
``tests/distributed/test_ray.py`` starts tensor-parallel engines on a local Ray cluster.
"""

from __future__ import annotations


def apply() -> None:
    from vllm.v1.executor import ray_executor_v2 as upstream

    executor, worker = upstream.RayExecutorV2, upstream.RayWorkerProc
    resources = executor.__dict__.get("_get_actor_resource_kwargs")
    node_ids = worker.__dict__.get("get_node_and_physical_gpu_ids")
    if getattr(node_ids, "_blockdiff_patched", False):
        return
    if resources is None or node_ids is None:
        raise RuntimeError("engine_patches.ray_executor_v2: the patched methods are gone upstream; update the patch")
    original_resources = resources.__func__ if isinstance(resources, staticmethod) else resources

    def _get_actor_resource_kwargs():
        if upstream.current_platform.is_cpu():
            return {"num_gpus": 0}
        return original_resources()

    def get_node_and_physical_gpu_ids(self):
        if upstream.current_platform.is_cpu():
            return upstream.ray.get_runtime_context().get_node_id(), []
        return node_ids(self)

    get_node_and_physical_gpu_ids._blockdiff_patched = True
    executor._get_actor_resource_kwargs = staticmethod(_get_actor_resource_kwargs)
    worker.get_node_and_physical_gpu_ids = get_node_and_physical_gpu_ids
