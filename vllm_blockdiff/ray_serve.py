"""Data parallelism with Ray Serve LLM: replicas of the plugin's vLLM engine behind one endpoint.

Why Ray Serve rather than vLLM's own ``--data-parallel-size``: vLLM's data-parallel engines share
one API server and are coordinated as one engine (a dead engine ends the whole server), while Ray
Serve replicas are independent engines: its router spreads requests by queue length, its
controller health-checks replicas and replaces dead ones, and the other replicas keep answering
meanwhile (tests/distributed/test_ray_serve.py kills one mid-load). It is also how Ray users
scale models (autoscaling, multi-model apps, multi-node). Each replica is a plain vLLM engine, so
the plugin loads in it by entry point like anywhere else.

    serve run vllm_blockdiff.ray_serve:build_app model=PATH_OR_HUB_ID num_replicas=2

Any other ``key=value`` is a vLLM engine argument (``tensor_parallel_size=2``,
``max_model_len=8192``, ...); values are read as JSON where they parse (numbers, true/false).

Install ``ray[serve]`` and ``pyarrow`` (the ``[ray]`` extra), not ``ray[llm]``: that extra pins an
older vLLM (ray 2.60: ``vllm==0.29.0``) while ``ray.serve.llm`` itself runs on vLLM 0.32 and 0.33.
On 0.33 Ray 2.60's Serve LLM imports ``FrontendArgs`` from where 0.32 kept it
(``vllm.entrypoints.launchers.cli_args``; 0.33 moved it to ``vllm.entrypoints.common.cli_args``):
``vllm_import_aliases`` maps the old path to the new one, here and, as the replicas'
``worker_process_setup_hook``, in every replica process (they import Ray's vLLM modules before vLLM
loads any plugin).
"""

from __future__ import annotations

import json
from typing import Any

SETUP_HOOK = "vllm_blockdiff.ray_serve.vllm_import_aliases"
_MOVED_MODULES = {  # Ray 2.60 imports the first, vLLM 0.33 has the second
    "vllm.entrypoints.launchers.cli_args": "vllm.entrypoints.common.cli_args",
}


def vllm_import_aliases() -> None:
    """Make the vLLM module paths Ray Serve LLM imports resolve on the running vLLM (nothing to do on 0.32)."""
    import importlib
    import sys

    for old, new in _MOVED_MODULES.items():
        try:
            importlib.import_module(old)
        except ModuleNotFoundError:
            module = importlib.import_module(new)
            sys.modules[old] = module
            parent, _, name = old.rpartition(".")
            setattr(importlib.import_module(parent), name, module)


def _has_accelerator() -> bool:
    from vllm.platforms import current_platform

    return not current_platform.is_cpu()


def llm_config(
    model: str,
    *,
    model_id: str | None = None,
    num_replicas: int = 2,
    **engine_kwargs: Any,
):
    """A Ray Serve ``LLMConfig`` for ``num_replicas`` independent engines of ``model``.

    On a CPU-only vLLM each worker takes one Ray CPU (Ray Serve LLM reads a placement group
    without GPUs as a CPU deployment); on GPUs Ray Serve LLM's defaults (one GPU per worker) hold.
    """
    vllm_import_aliases()
    from ray.serve.llm import LLMConfig

    config: dict[str, Any] = dict(
        model_loading_config=dict(model_id=model_id or model, model_source=model),
        deployment_config=dict(num_replicas=num_replicas),
        engine_kwargs=engine_kwargs,
        # vLLM's metrics of every replica, tagged with its ReplicaId, on Ray's Prometheus endpoint.
        log_engine_metrics=True,
        runtime_env={"worker_process_setup_hook": SETUP_HOOK},
    )
    if not _has_accelerator():
        workers = engine_kwargs.get("tensor_parallel_size", 1) * engine_kwargs.get("pipeline_parallel_size", 1)
        config["placement_group_config"] = dict(bundles=[{"CPU": 1}] * workers)
    return LLMConfig(**config)


def _parse(value: str) -> Any:
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return value


def build_app(args: dict[str, Any]):
    """Ray Serve application builder: an OpenAI-compatible app over ``num_replicas`` replicas."""
    vllm_import_aliases()
    from ray.serve.llm import build_openai_app

    kwargs = {key: _parse(value) if isinstance(value, str) else value for key, value in args.items()}
    if "model" not in kwargs:
        raise ValueError("build_app needs model=<checkpoint path or hub id>")
    model = str(kwargs.pop("model"))
    model_id = kwargs.pop("model_id", None)
    num_replicas = int(kwargs.pop("num_replicas", 2))
    config = llm_config(model, model_id=None if model_id is None else str(model_id), num_replicas=num_replicas,
                        **kwargs)
    return build_openai_app({"llm_configs": [config]})
