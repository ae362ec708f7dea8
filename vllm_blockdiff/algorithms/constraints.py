"""A request's vocabulary constraints, applied to a diffusion row's logits before the decoding rule.

The standard fields ``logit_bias``, ``allowed_token_ids``, ``bad_words`` and ``min_tokens`` act on
vLLM's one next-token distribution; a block-diffusion step has one distribution per canvas
position (BD3LM) or window row (SDLM), and each of them gets the same treatment:

- ``logit_bias``: added to the logits (vLLM's order: before temperature and filters);
- ``allowed_token_ids``: every other token's logit is ``-inf``;
- ``min_tokens``: the stop ids (eos and ``stop_token_ids``) are ``-inf`` at output positions below
  ``min_tokens``;
- ``bad_words`` (token sequences, as vLLM tokenizes them): a token is ``-inf`` at a position where
  it would complete a bad word with the tokens already known around that position. vLLM looks
  at the tokens before a position only (they are all known in autoregressive decoding); here a
  position may be filled before its left neighbours, so every alignment counts. Positions
  decided in the same step are checked against each other by the caller
  (:func:`completing_tokens` on the updated sequence).

Confidence (the probability the decoding rules compare) is then computed from the constrained,
renormalised distribution, as vLLM's logprobs of processed logits would be. Like vLLM, bad words
are matched within the output only (not across the prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

UNKNOWN = -1  # a position of the output whose token is not decided yet


def completing_tokens(seq: Sequence[int], index: int, sequences: Sequence[Sequence[int]]) -> set[int]:
    """Tokens that, placed at ``seq[index]``, would complete one of ``sequences`` with the tokens known
    around it (``seq`` holds output tokens, ``UNKNOWN`` where undecided; ``index`` may be ``len(seq)``)."""
    banned = set()
    n = len(seq)
    for word in sequences:
        m = len(word)
        for k in range(m):  # index is the k-th token of this occurrence
            start = index - k
            if start < 0:
                continue
            if all(j == k or (start + j < n and seq[start + j] == word[j]) for j in range(m)):
                banned.add(word[k])
    return banned


@dataclass
class VocabConstraints:
    bias: dict[int, float]
    allowed: tuple[int, ...] | None
    single_bans: tuple[int, ...]  # one-token bad words: never emitted
    sequences: tuple[tuple[int, ...], ...]  # bad words of two or more tokens
    stop_ids: tuple[int, ...]
    min_tokens: int
    _bases: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_params(cls, params) -> VocabConstraints | None:
        """The constraints a ``SamplingParams`` asks for, or ``None`` when it asks for none."""
        bad = [tuple(w) for w in (getattr(params, "bad_words_token_ids", None) or []) if w]
        stop_ids = tuple(sorted(getattr(params, "all_stop_token_ids", None) or ()))
        min_tokens = int(getattr(params, "min_tokens", 0) or 0)
        bias = {int(k): float(v) for k, v in (params.logit_bias or {}).items()}
        allowed = tuple(params.allowed_token_ids) if params.allowed_token_ids else None
        if not (bias or allowed or bad or (min_tokens and stop_ids)):
            return None
        return cls(bias, allowed, tuple(w[0] for w in bad if len(w) == 1), tuple(w for w in bad if len(w) > 1),
                   stop_ids, min_tokens)

    def base(self, vocab_size: int, device) -> torch.Tensor:
        """The position-independent part: an additive ``[vocab]`` row (bias, allowed set, one-token bans),
        built once per vocabulary size and device."""
        key = (vocab_size, str(device))
        if key not in self._bases:
            self._bases[key] = self._build_base(vocab_size).to(device)
        return self._bases[key]

    def _build_base(self, vocab_size: int) -> torch.Tensor:
        row = torch.zeros(vocab_size, dtype=torch.float32)
        if self.allowed is not None:
            row.fill_(-torch.inf)
            row[list(self.allowed)] = 0.0
        for token, value in self.bias.items():
            row[token] += value
        if self.single_bans:
            row[list(self.single_bans)] = -torch.inf
        return row

    def banned_at(self, seq: Sequence[int], index: int) -> set[int]:
        """Position-dependent bans at output position ``index``: stop ids below ``min_tokens``, and the
        tokens that would complete a multi-token bad word there."""
        banned = set(self.stop_ids) if index < self.min_tokens else set()
        if self.sequences:
            banned |= completing_tokens(seq, index, self.sequences)
        return banned

    def apply(self, logits: torch.Tensor, seq: Sequence[int], indices: Sequence[int]) -> torch.Tensor:
        """``logits`` ``[rows, vocab]`` of output positions ``indices`` (float32), constrained."""
        out = logits.float() + self.base(logits.shape[-1], logits.device)
        rows, cols = [], []
        for r, index in enumerate(indices):
            banned = self.banned_at(seq, index)
            rows += [r] * len(banned)
            cols += list(banned)
        if rows:
            out[torch.tensor(rows, device=out.device), torch.tensor(cols, device=out.device)] = -torch.inf
        return out


def allowed_prefix(constraints: VocabConstraints, output: Sequence[int], tokens: Sequence[int]) -> int:
    """How many of ``tokens`` (to be appended to ``output`` in order, e.g. an SDLM accepted prefix) can
    commit before one would complete a multi-token bad word; at least the first, whose row was
    constrained with the whole output known."""
    seq = list(output)
    for j, token in enumerate(tokens):
        if j and token in completing_tokens(seq, len(seq), constraints.sequences):
            return j
        seq.append(token)
    return len(tokens)


def allowed_by_bitmask(bitmask: np.ndarray, vocab_size: int) -> torch.Tensor:
    """A grammar's packed token bitmask (int32 words, bit 1 = allowed, vLLM/xgrammar layout), unpacked to
    ``[rows, vocab_size]`` bools."""
    bits = np.unpackbits(np.ascontiguousarray(bitmask).view(np.uint8), axis=-1, bitorder="little")
    allowed = np.zeros((bits.shape[0], vocab_size), dtype=bool)
    width = min(vocab_size, bits.shape[1])
    allowed[:, :width] = bits[:, :width]
    return torch.from_numpy(allowed)


def mask_by_bitmask(logits: torch.Tensor, rows: Sequence[int], bitmask: np.ndarray) -> None:
    """In place: at each of ``rows``, tokens its grammar's bitmask row (``bitmask``, one per row, in order)
    rules out get ``-inf``."""
    if not rows:
        return
    allowed = allowed_by_bitmask(bitmask, logits.shape[-1]).to(logits.device)
    index = torch.tensor(list(rows), device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed, -torch.inf)
