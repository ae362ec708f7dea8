"""Small, documented changes to upstream vLLM symbols, one module per patched upstream module.

Each module's docstring says: the upstream symbol it changes, why, how, and which test fails
if upstream moves. ``PATCHES`` is the registry ``tests/engine_patches`` checks against the
files in this folder, so a patch cannot be added without being applied and documented.
"""

from __future__ import annotations

import importlib

PATCHES = (
    "input_processor",
    "metrics_loggers",
    "openai_completion_serving",
    "openai_chat_serving",
    "cpu_platform",
    "ray_executor_v2",
)


def apply_all() -> None:
    for name in PATCHES:
        importlib.import_module(f"engine_patches.{name}").apply()
