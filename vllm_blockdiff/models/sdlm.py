"""SDLM checkpoints (OpenGVLab SDLM-3B-D4/D8, SDLM-32B-D4): Qwen2.5 weights, window decoding.

``config.json`` says ``model_type: qwen2`` with SDLM's fields beside (``block_size`` = the window
D, ``text_mask_token_id``, ``causal_attn``), so transformers' own ``Qwen2Config`` parses it and no
remote code is needed. Logits are AR-style (position i predicts token i+1); what differs from
Qwen2 is the attention of the window, which the engine supplies (``vllm_blockdiff.engine.sdlm``).
"""

from __future__ import annotations

from vllm_blockdiff.models.qwen2 import StoredHeadQwen2ForCausalLM


class SDLMQwen2ForCausalLM(StoredHeadQwen2ForCausalLM):
    """SDLM's Qwen2: the vocabulary resized to the tokenizer (151666, ``<text_mask>`` included)."""
