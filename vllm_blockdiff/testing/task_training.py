"""What the trained tiny checkpoints (``trained_sdlm``, ``trained_bd3lm``) share: a blank Qwen2 of a built
checkpoint's shape, trained on one thread, with only the vocabulary rows its synthetic task uses.

Only those rows of the embedding and of the lm_head are trained (as parameters of their own); the lm_head's
other rows are exactly zero, so the full-vocabulary log-softmax is ``logsumexp(task logits) ⊕ log(V - K)``
and training computes it exactly on the K task rows.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from vllm_blockdiff.testing.tiny_checkpoints import load_weights, save_weights

_CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rope_theta", "rms_norm_eps")


@contextlib.contextmanager
def one_thread():
    """Deterministic, and faster than 2 threads on these small matmuls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def blank_qwen2(ckpt: Path):
    """A transformers ``Qwen2ForCausalLM`` (untied head, sdpa: takes additive 4-D masks as they are) of the
    shape in ``ckpt/config.json``, initialised from the global torch RNG."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = json.loads((ckpt / "config.json").read_text())
    qwen2 = Qwen2Config(tie_word_embeddings=False, **{k: config[k] for k in _CONFIG_FIELDS})
    qwen2._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(qwen2)


def save_trained(model, ckpt: Path) -> None:
    """Overwrite ``ckpt``'s weights with ``model``'s, which must carry the published names."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert state.keys() == set(load_weights(ckpt)), "trained weights must keep the published names"
    save_weights(ckpt, state)


def learning_rate(step: int, steps: int, peak: float, warmup: int = 50) -> float:
    """Linear warm-up, cosine decay."""
    return peak * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


class TaskRows:
    """The trained embedding rows (``embed_ids``) and lm_head rows (``head_ids``) of a task."""

    def __init__(self, model, embed_ids: Sequence[int], head_ids: Sequence[int]):
        self.embed_ids, self.head_ids = list(embed_ids), list(head_ids)
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed.requires_grad_(False)
        head.requires_grad_(False)
        self.embed = torch.nn.Parameter(embed[self.embed_ids].clone())
        self.head = torch.nn.Parameter(torch.randn(len(self.head_ids), head.shape[1]) * head.shape[1] ** -0.5)
        self.background = torch.tensor(math.log(head.shape[0] - len(self.head_ids)))  # the other logits are 0

    def log_z(self, logits: torch.Tensor) -> torch.Tensor:
        """The full-vocabulary log-partition of task-row ``logits`` ``[N, K]``."""
        return torch.logaddexp(torch.logsumexp(logits, dim=-1), self.background)

    @torch.no_grad()
    def store(self, model) -> None:
        """Write the rows into ``model``; every other lm_head row becomes zero."""
        model.model.embed_tokens.weight[self.embed_ids] = self.embed
        head = model.lm_head.weight
        head.zero_()
        head[self.head_ids] = self.head
