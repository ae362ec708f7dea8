"""Let vLLM's Ray executor place CPU workers.

Target: ``vllm.platforms.cpu.CpuPlatform.ray_device_key`` (``""`` upstream).
Why: the Ray executor asks the platform which Ray resource one worker needs and refuses
platforms without one ("current platform cpu does not support ray"), so Ray-distributed
serving could not be exercised on CPU at all (CI has no GPU). CPU workers need a Ray ``CPU``
slot each and talk over gloo, which the CPU platform already uses for tensor parallelism.
How: set ``ray_device_key = "CPU"`` when it is empty (a GPU platform is never touched).
Upstream PR: none; removable when vLLM's CPU platform declares its Ray resource itself.
Drift guard: raises at apply time if ``CpuPlatform`` or its ``ray_device_key`` attribute is gone;
``tests/distributed/test_ray.py`` runs tensor-parallel engines on a local Ray cluster.
"""

from __future__ import annotations


def apply() -> None:
    from vllm.platforms import cpu as upstream

    platform = getattr(upstream, "CpuPlatform", None)
    if platform is None or not hasattr(platform, "ray_device_key"):
        raise RuntimeError("engine_patches.cpu_platform: CpuPlatform.ray_device_key is gone upstream; update the patch")
    if not platform.ray_device_key:
        platform.ray_device_key = "CPU"
