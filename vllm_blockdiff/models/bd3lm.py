"""BD3LM checkpoints of the dLLM framework ("A2D" Qwen2): Qwen2 weights, block-diffusion decoding.

The network is vLLM's own Qwen2; what differs is the checkpoint format (``model_type:
a2d-qwen2``, a remote-code ``auto_map`` we do not need) and the attention pattern, which the
engine supplies through attention metadata (see ``vllm_blockdiff.engine.segments``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import Qwen2Config
from vllm.config import VllmConfig
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM


class A2DQwen2Config(Qwen2Config):
    """``model_type="a2d-qwen2"``: the Qwen2 config under dLLM's name, so no remote code is needed."""

    model_type = "a2d-qwen2"


class A2DQwen2LMHeadModel(Qwen2ForCausalLM):
    """Qwen2 with a stored ``lm_head.weight`` honoured even when ``tie_word_embeddings`` is true.

    dLLM checkpoints saved under ZeRO keep an untied head while the config still says tied;
    silently tying would replace the trained head by the embeddings.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        config = vllm_config.model_config.hf_config.get_text_config()
        tied = config.tie_word_embeddings
        # Build an untied head; re-tie after loading if the checkpoint has no head of its own.
        config.tie_word_embeddings = False
        try:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        finally:
            config.tie_word_embeddings = tied

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        seen_head = False

        def watch(stream):
            nonlocal seen_head
            for name, tensor in stream:
                seen_head |= name == "lm_head.weight"
                yield name, tensor

        loaded = super().load_weights(watch(weights))
        if not seen_head and hasattr(self.lm_head, "tie_weights"):
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
            loaded.add("lm_head.weight")
        return loaded
