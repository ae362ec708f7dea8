"""Independent decoding references (BD3LM, SDLM) on plain ``transformers`` Qwen2 models.

They define the expected output of the engine in tests and serve as baselines in benchmarks; they share no
code with ``vllm_blockdiff``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

# config.json fields that map 1:1 onto transformers' Qwen2Config (everything else — architectures, auto_map,
# model_type, block_size, text_mask_token, ... — is family metadata the plain Qwen2 model does not need).
_QWEN2_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def load_reference_model(
    ckpt_dir: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
    device: str | torch.device = "cpu",
):
    """Load a BD3LM or SDLM checkpoint directory as a plain ``transformers.Qwen2ForCausalLM`` (eval mode).

    No remote code is involved: a ``Qwen2Config`` is built from config.json's Qwen2 fields. A stored
    ``lm_head.weight`` is always used, even when config.json says ``tie_word_embeddings: true`` (ZeRO-saved
    dLLM checkpoints do that); otherwise the head is tied to the embedding. Loading is strict: any missing or
    unexpected weight raises.
    """
    from safetensors import safe_open
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from vllm_blockdiff.testing.tiny_checkpoints import weight_files

    ckpt = Path(ckpt_dir)
    raw = json.loads((ckpt / "config.json").read_text())
    stored = set()
    for path in weight_files(ckpt):  # one file, or shards listed in model.safetensors.index.json
        with safe_open(str(path), framework="pt") as f:
            stored |= set(f.keys())
    fields = {k: raw[k] for k in _QWEN2_FIELDS if k in raw}
    fields["tie_word_embeddings"] = "lm_head.weight" not in stored
    config = Qwen2Config(**fields)
    model, info = Qwen2ForCausalLM.from_pretrained(
        str(ckpt),
        config=config,
        dtype=dtype,
        attn_implementation=attn_implementation,
        output_loading_info=True,
    )
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise RuntimeError(f"{ckpt}: weights do not match Qwen2ForCausalLM: {problems}")
    return model.to(device).eval()
