"""A plain Qwen2 checkpoint (``Qwen2ForCausalLM``, not one of ours), for the tests that check the plugin
changes nothing for other models."""

from __future__ import annotations

import json
from pathlib import Path


def build_plain_qwen2(out: Path, seed: int = 2) -> Path:
    """The tiny BD3LM layout re-labelled as vLLM's own ``Qwen2ForCausalLM`` (model_type qwen2)."""
    from vllm_blockdiff.testing.tiny_checkpoints import build_bd3lm_checkpoint

    ckpt = build_bd3lm_checkpoint(out, seed=seed)
    config = json.loads((ckpt / "config.json").read_text())
    config.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    config.pop("auto_map")
    (ckpt / "config.json").write_text(json.dumps(config, indent=2))
    return ckpt
