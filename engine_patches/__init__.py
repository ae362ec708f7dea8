"""Small, documented changes to upstream vLLM symbols, one module per patched upstream module.

Each module's docstring says: the upstream symbol it changes, why, how, and which test fails
if upstream moves. ``PATCHES`` is the registry ``tests/engine_patches`` checks against the
files in this folder, so a patch cannot be added without being applied and documented.

A patch is applied only when its upstream module is imported (a post-import hook,
``engine_patches._hooks``): processes that never use a target (a worker never imports the
OpenAI server, a server without Ray never imports the Ray executor) never load it, and a
patch whose optional dependency is missing (``requires``) is never attempted. Every patch
also checks that the served model is ours before changing behaviour, so other models run
vLLM's own code paths.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from engine_patches._hooks import when_imported


@dataclass(frozen=True)
class Patch:
    target: str  # the upstream module whose import applies the patch
    requires: tuple[str, ...] = ()  # optional distributions the target needs


PATCHES: dict[str, Patch] = {
    "input_processor": Patch("vllm.v1.engine.input_processor"),
    "async_llm": Patch("vllm.v1.engine.async_llm"),
    "metrics_loggers": Patch("vllm.v1.metrics.loggers"),
    "tokenizers_hf": Patch("vllm.tokenizers.hf"),
    "openai_completion_serving": Patch("vllm.entrypoints.openai.completion.serving"),
    "openai_chat_serving": Patch("vllm.entrypoints.openai.chat_completion.serving"),
    "beam_search_online": Patch("vllm.entrypoints.generate.beam_search.online"),
    "beam_search_offline": Patch("vllm.entrypoints.generate.beam_search.offline"),
    "cpu_platform": Patch("vllm.platforms.cpu", requires=("ray",)),
    "ray_executor_v2": Patch("vllm.v1.executor.ray_executor_v2", requires=("ray",)),
}


def importable(name: str) -> bool:
    """Whether ``import name`` can work, without importing it (a module blocked by
    ``sys.modules[name] = None`` counts as missing, as the import system treats it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


FAILED: dict[str, Exception] = {}  # patch name -> why it could not apply (upstream drift)


def _apply(name: str) -> None:
    # Never break the import of an upstream module (other models need it): a patch that cannot
    # apply is recorded, and the config hook refuses to serve our models without it.
    try:
        importlib.import_module(f"engine_patches.{name}").apply()
    except Exception as err:  # noqa: BLE001 - any drift, reported by name
        FAILED[name] = err
        from vllm.logger import init_logger

        init_logger(__name__).warning("vllm_blockdiff: engine patch %s did not apply: %s", name, err)


def apply_all() -> None:
    """Arrange for every patch to apply when its target is imported (now, if it already is)."""
    for name, patch in PATCHES.items():
        if all(importable(dep) for dep in patch.requires):
            when_imported(patch.target, lambda name=name: _apply(name))
