"""BD3LM checkpoints of the dLLM framework ("A2D" Qwen2): Qwen2 weights, block-diffusion decoding.

The network is vLLM's own Qwen2; what differs is the checkpoint format (``model_type:
a2d-qwen2``, a remote-code ``auto_map`` we do not need) and the attention pattern, which the
engine supplies through attention metadata (see ``vllm_blockdiff.engine.segments``).
"""

from __future__ import annotations

from transformers import Qwen2Config

from vllm_blockdiff.models.qwen2 import StoredHeadQwen2ForCausalLM


class A2DQwen2Config(Qwen2Config):
    """``model_type="a2d-qwen2"``: the Qwen2 config under dLLM's name, so no remote code is needed."""

    model_type = "a2d-qwen2"


class A2DQwen2LMHeadModel(StoredHeadQwen2ForCausalLM):
    """dLLM's A2D Qwen2: no logit shift (position i predicts the token at i), same weights as Qwen2."""
