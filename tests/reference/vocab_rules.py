"""Reference vocabulary rules for the standard fields ``logit_bias``, ``allowed_token_ids``, ``bad_words``
and ``min_tokens``, written from their definitions (vLLM's docs, extended to rows decided out of order):

- the logits of a row at output position ``i`` get ``logit_bias`` added; tokens outside
  ``allowed_token_ids`` get ``-inf``; the stop ids get ``-inf`` while ``i < min_tokens``;
- a token gets ``-inf`` at ``i`` if putting it there would make a bad word (a token sequence) appear in
  the output, given the tokens already known at the other positions (``None`` = not decided yet).

Independent of ``vllm_blockdiff``: the engine's implementation is checked against this one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class RefVocabRules:
    logit_bias: dict[int, float] = field(default_factory=dict)
    allowed_token_ids: Sequence[int] | None = None
    bad_words: Sequence[Sequence[int]] = ()  # token id sequences
    stop_ids: Sequence[int] = ()
    min_tokens: int = 0

    def completes_bad_word(self, seq: Sequence[int | None], index: int, token: int) -> bool:
        trial = list(seq) + [None] * (index + 1 - len(seq))
        trial[index] = token
        for word in self.bad_words:
            m = len(word)
            for start in range(max(0, index - m + 1), index + 1):
                window = trial[start : start + m]
                if len(window) == m and all(a == b for a, b in zip(window, word)):
                    return True
        return False

    def banned(self, seq: Sequence[int | None], index: int, vocab: int) -> list[int]:
        ids = set(self.stop_ids) if index < self.min_tokens else set()
        candidates = {w[k] for w in self.bad_words for k in range(len(w))}
        ids |= {t for t in candidates if t < vocab and self.completes_bad_word(seq, index, t)}
        return sorted(ids)

    def apply(self, logits: torch.Tensor, seq: Sequence[int | None], indices: Sequence[int]) -> torch.Tensor:
        """``logits`` ``[rows, V]`` of output positions ``indices``, in float32, with the rules applied."""
        out = logits.float().clone()
        vocab = out.shape[-1]
        for token, bias in self.logit_bias.items():
            out[:, token] += bias
        if self.allowed_token_ids is not None:
            keep = torch.zeros(vocab, dtype=torch.bool)
            keep[list(self.allowed_token_ids)] = True
            out[:, ~keep.to(out.device)] = -torch.inf
        for r, index in enumerate(indices):
            ids = self.banned(seq, index, vocab)
            if ids:
                out[r, ids] = -torch.inf
        return out
