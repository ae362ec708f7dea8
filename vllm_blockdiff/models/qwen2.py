"""vLLM's Qwen2 with the checkpoint's own ``lm_head.weight`` honoured even under ``tie_word_embeddings``.

Both families fine-tune Qwen2.5 checkpoints whose config may say "tied" while the file stores a
head of its own (dLLM saves under ZeRO untied; SDLM resizes the vocabulary). Silently tying would
replace the trained head by the embeddings, so the head is built untied and re-tied only when the
checkpoint has no ``lm_head.weight``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM


class StoredHeadQwen2ForCausalLM(Qwen2ForCausalLM):
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
