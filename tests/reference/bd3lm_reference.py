"""Reference BD3LM decoding: the dLLM seed card's ``generate()`` semantics on a plain ``Qwen2ForCausalLM``.

Written from the algorithm (DESIGN.md §2), one sequence at a time, or a batch of equal-length prompts:

1. Chunks. The first chunk completes the prompt's partial last block: ``block_size - T % block_size`` tokens
   (``block_size`` when aligned), capped by the tokens still allowed; later chunks are whole blocks. Chunk
   tokens start as ``mask_id``.
2. Schedule. ``steps_per_block = ceil(steps / ceil(max_new_tokens / block_size))``; a chunk of n tokens commits
   ``n // s`` tokens per step, the first ``n % s`` steps one more. Steps that would commit 0 tokens are
   skipped entirely (no forward, no random draws). The card runs them, but they only burn random numbers.
3. Logits. The chunk's queries see every prefix token (block id = absolute position // block_size, all ≤ the
   chunk's) and the whole chunk bidirectionally. The prefix tokens' keys/values come from a prefix pass over
   the prefix alone with the staircase mask (``blk(k) <= blk(q)``), so the prompt tail that shares the
   chunk's block does *not* see the chunk while it is denoised (DESIGN.md §2 "Trap"). No logit shift: the
   logit at position i predicts the token at position i.
4. Commit. ``x0 = argmax(exp(logits) / (-log u) ** temperature)`` in float64 (the card's Gumbel trick; plain
   argmax at temperature 0); confidence = ``softmax(logits)[x0]`` (``low_confidence``, softmax in float32) or
   uniform (``random``); the top-k still-masked positions by confidence (ties: the lower position first;
   the card's ``torch.topk`` leaves equal values to the kernel) take their ``x0``. "Still masked" is
   re-derived as ``token == mask_id`` every step, as the card does.
5. CFG. ``cfg_scale > 0`` adds an unconditional pass whose prefix is all ``mask_id`` (same mask, positions):
   ``logits = un + (cfg_scale + 1) * (cond - un)``.
6. EOS. After every step, if the chunk holds any id of ``eos_ids``, the sequence stops; the returned tokens are
   the generated tokens so far (the last chunk may still hold mask ids before the eos), cut right after the
   first eos. Otherwise exactly ``max_new_tokens`` tokens are returned.
7. When a chunk is complete the next prefix pass recomputes the whole sequence (staircase), so the finished
   block — prompt tail included — gets clean keys/values before the next chunk.

Randomness: one CPU ``torch.Generator`` per sequence, seeded with ``seed`` (fresh entropy when None). Per
step it draws, in this order, ``u = torch.rand((chunk_len, vocab), dtype=float64)`` when temperature > 0,
then ``torch.rand((chunk_len,))`` (float32) for ``random`` remasking.

Not reproduced from the card: its pad handling. The card treats every token equal to the pad id as padding
(excluded from attention, positions shifted); here there is no padding at all — a prompt or generated token
that happens to equal the pad id is an ordinary token. The batched helper requires equal-length prompts for
exactly that reason.

Two implementations of step 3, which must agree token for token:

* ``impl="cached"`` (like the card): a prefix forward with ``use_cache=True``, then one chunk forward per step
  on top of that cache (the chunk's keys/values are cropped off again after each step, which is what the
  card's ``copy.deepcopy`` of the cache achieves, minus the copy).
* ``impl="full"``: one forward over prefix + chunk per step with the 4-D mask
  ``M[q, k] = blk(k) <= blk(q) and (k < T or q >= T)`` (T = prefix length): prefix queries never see the chunk.

Masks are passed to transformers as additive float 4-D masks ``[B, 1, q_len, kv_len]`` (0 = attend, dtype-min
= blocked) with explicit ``position_ids``: transformers >= 5 passes a 4-D mask through untouched, and the
eager attention *adds* it to the scores, so a boolean mask would silently be wrong there.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache

MASK_ID = 151665
EOS_IDS = (151645,)  # the card checks tokenizer.eos_token_id only (<|im_end|>)

_IMPLS = ("cached", "full")
_REMASKING = ("low_confidence", "random")


# ------------------------------------------------------------------------------------------------------------
# Pure helpers
# ------------------------------------------------------------------------------------------------------------
def first_chunk_len(prefix_len: int, block_size: int) -> int:
    """Tokens until the next block boundary (a whole block when the prefix is aligned)."""
    return block_size - prefix_len % block_size


def steps_per_block(max_new_tokens: int, steps: int, block_size: int) -> int:
    """The card's per-chunk step budget: ``ceil(steps / ceil(max_new_tokens / block_size))``."""
    return math.ceil(steps / math.ceil(max_new_tokens / block_size))


def commit_schedule(num_masked: int, steps: int) -> list[int]:
    """Tokens committed per step: uniform split, remainder to the first steps, zero-commit steps dropped."""
    base, rem = divmod(num_masked, steps)
    counts = [base + 1] * rem + [base] * (steps - rem)
    return [c for c in counts if c > 0]


def staircase_allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[q, k]`` bool: key k is visible to query q iff ``blk(k) <= blk(q)``."""
    return (k_pos // block_size)[None, :] <= (q_pos // block_size)[:, None]


def additive_mask(allowed: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """``[batch, 1, q, k]`` additive float mask from a ``[q, k]`` bool mask (True = attend)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None].expand(batch, 1, *allowed.shape)


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()  # CPU: the draws do not depend on the model's device
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def commit_count(conf: torch.Tensor, num_commit: int, threshold: float | None, factor: float | None) -> int:
    """How many masked positions commit: the card's ``num_commit``; with ``threshold`` also every one whose
    confidence exceeds it; with ``factor`` (Fast-dLLM) at least the largest n with (n + 1)(1 - c_n) < factor
    (``c_n`` the n-th highest confidence); never more than are masked. ``conf``: -inf where not masked."""
    masked = int(torch.isfinite(conf).sum())
    k = min(num_commit, masked)
    if threshold is not None:
        k = max(k, int((conf > threshold).sum()))
    if factor is not None:
        ranked = sorted(conf[torch.isfinite(conf)].tolist(), reverse=True)
        n = 0
        while n < len(ranked) and (n + 2) * (1 - ranked[n]) < factor:  # n + 1 positions: (n+1+1)(1-c_{n+1})
            n += 1
        k = max(k, n, 1)
    return min(k, masked)


def commit_step(
    logits: torch.Tensor,
    chunk: torch.Tensor,
    num_commit: int,
    *,
    temperature: float,
    remasking: str,
    mask_id: int,
    generator: torch.Generator,
    threshold: float | None = None,
    factor: float | None = None,
    rules=None,
    prefix: Sequence[int] = (),
) -> torch.Tensor:
    """One denoising step for one sequence: returns the chunk ``[L]`` with new tokens committed.

    ``logits`` is ``[L, V]`` for the chunk positions (no shift). ``rules`` (``vocab_rules.RefVocabRules``)
    constrain every row (output position ``len(prefix) + i``) before sampling; the positions committed in
    one step are then placed in descending confidence, each re-chosen among its allowed tokens if it would
    complete a bad word with those placed before it.
    """
    length, vocab = logits.shape
    logits = logits.float()
    masked = chunk == mask_id
    if rules is not None:
        seq = list(prefix) + [None if m else int(t) for t, m in zip(chunk.tolist(), masked.tolist())]
        logits = rules.apply(logits, seq, [len(prefix) + i for i in range(length)])
    if temperature > 0:
        u = torch.rand((length, vocab), dtype=torch.float64, generator=generator).to(logits.device)
        scores = logits.double().exp() / (-torch.log(u)) ** temperature
    else:
        scores = logits
    x0 = scores.argmax(dim=-1)
    if remasking == "low_confidence":
        conf = F.softmax(logits, dim=-1).gather(-1, x0[:, None]).squeeze(-1)
    elif remasking == "random":
        conf = torch.rand((length,), generator=generator).to(logits.device)
    else:
        raise ValueError(f"unknown remasking {remasking!r}; valid: {_REMASKING}")
    conf = torch.where(masked, conf, torch.full_like(conf, -math.inf))
    k = commit_count(conf, num_commit, threshold, factor)
    out = chunk.clone()
    if k > 0:
        # The k most confident, ties toward the lower position: a confident model's probabilities round
        # to 1.0 in float32, and the card's torch.topk leaves the order of equal values to the kernel.
        idx = torch.sort(conf, descending=True, stable=True).indices[:k]
        if rules is None or not rules.bad_words:
            out[idx] = x0[idx]
            return out
        for i in idx.tolist():
            seq = list(prefix) + [None if t == mask_id else int(t) for t in out.tolist()]
            token = int(x0[i])
            if rules.completes_bad_word(seq, len(prefix) + i, token):
                row = scores[i].clone()
                row[rules.banned(seq, len(prefix) + i, vocab)] = -math.inf if temperature == 0 else 0.0
                token = int(row.argmax())
            out[i] = token
    return out


def truncate_after_eos(tokens: list[int], eos_ids: Sequence[int]) -> list[int]:
    """Cut right after the first eos (inclusive)."""
    eos = set(eos_ids)
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


# ------------------------------------------------------------------------------------------------------------
# Chunk logits: two equivalent attention paths
# ------------------------------------------------------------------------------------------------------------
def _forward(model, ids, allowed, positions, *, past=None, keep: int = 0):
    """One forward with a custom mask; ``keep`` > 0 computes logits for the last ``keep`` positions only."""
    batch = ids.shape[0]
    dtype = model.get_input_embeddings().weight.dtype
    return model(
        input_ids=ids,
        attention_mask=additive_mask(allowed, batch, dtype),
        position_ids=positions[None].expand(batch, -1),
        past_key_values=past,
        use_cache=past is not None,
        logits_to_keep=keep,
    )


class _CachedChunkLogits:
    """Prefix pass(es) once per chunk, then one chunk forward per step on top of the prefix cache."""

    def __init__(self, model, prefix: torch.Tensor, *, block_size: int, cfg_scale: float, mask_id: int):
        self.model, self.block_size, self.cfg_scale = model, block_size, cfg_scale
        self.prefix_len = prefix.shape[1]
        pos = torch.arange(self.prefix_len, device=prefix.device)
        allowed = staircase_allowed(pos, pos, block_size)
        self.caches = [self._prefill(prefix, allowed, pos)]
        if cfg_scale > 0:
            self.caches.append(self._prefill(torch.full_like(prefix, mask_id), allowed, pos))

    def _prefill(self, ids, allowed, pos):
        cache = DynamicCache(config=self.model.config)
        _forward(self.model, ids, allowed, pos, past=cache, keep=1)  # prefix logits are never used
        return cache

    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        T, L = self.prefix_len, chunk.shape[1]
        q_pos = torch.arange(T, T + L, device=chunk.device)
        allowed = staircase_allowed(q_pos, torch.arange(T + L, device=chunk.device), self.block_size)
        logits = [self._step(cache, chunk, allowed, q_pos) for cache in self.caches]
        if self.cfg_scale > 0:
            cond, un = logits
            return un + (self.cfg_scale + 1.0) * (cond - un)
        return logits[0]

    def _step(self, cache, chunk, allowed, q_pos):
        logits = _forward(self.model, chunk, allowed, q_pos, past=cache, keep=chunk.shape[1]).logits.float()
        # Drop the chunk's keys/values again: every step must start from the prefix-only cache.
        # (transformers 5.x: crop(-n) removes n tokens; crop(positive) is the deprecated absolute form.)
        cache.crop(-chunk.shape[1])
        assert cache.get_seq_length() == self.prefix_len
        return logits


class _FullChunkLogits:
    """One forward over prefix + chunk per step; prefix queries are masked off the chunk."""

    def __init__(self, model, prefix: torch.Tensor, *, block_size: int, cfg_scale: float, mask_id: int):
        self.model, self.block_size, self.cfg_scale = model, block_size, cfg_scale
        self.prefixes = [prefix] + ([torch.full_like(prefix, mask_id)] if cfg_scale > 0 else [])

    def __call__(self, chunk: torch.Tensor) -> torch.Tensor:
        T, L = self.prefixes[0].shape[1], chunk.shape[1]
        pos = torch.arange(T + L, device=chunk.device)
        allowed = staircase_allowed(pos, pos, self.block_size)
        allowed &= (pos[None, :] < T) | (pos[:, None] >= T)  # the prefix does not see the chunk
        logits = [
            _forward(self.model, torch.cat([p, chunk], dim=1), allowed, pos, keep=L).logits.float()
            for p in self.prefixes
        ]
        if self.cfg_scale > 0:
            cond, un = logits
            return un + (self.cfg_scale + 1.0) * (cond - un)
        return logits[0]


# ------------------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_bd3lm_batch(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    steps: int,
    block_size: int = 32,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    cfg_scale: float = 0.0,
    mask_id: int = MASK_ID,
    eos_ids: Sequence[int] = EOS_IDS,
    seeds: Sequence[int | None] | None = None,
    impl: str = "cached",
    threshold: float | None = None,
    factor: float | None = None,
    rules=None,
    forwards: list[int] | None = None,
) -> list[list[int]]:
    """The card's batched loop for equal-length prompts; returns each sequence's generated tokens.

    ``threshold`` / ``factor``: the parallel-decoding rules (see :func:`commit_count`); a chunk whose masks
    are all committed ends at once. ``rules``: vocabulary rules (``vocab_rules.RefVocabRules``) for every
    row. ``forwards``, if given, receives each sequence's number of denoising forwards.

    Every row gets exactly what :func:`generate_bd3lm` returns for it alone with ``seed=seeds[i]`` (batching
    only changes how many rows share a forward). A finished row stays in the batch — it keeps being computed,
    like in the card — but its tokens and random draws are frozen; the loop ends when every row finished or
    ``max_new_tokens`` are generated.
    """
    if impl not in _IMPLS:
        raise ValueError(f"unknown impl {impl!r}; valid: {_IMPLS}")
    if remasking not in _REMASKING:
        raise ValueError(f"unknown remasking {remasking!r}; valid: {_REMASKING}")
    if not prompts or any(len(p) != len(prompts[0]) for p in prompts) or len(prompts[0]) == 0:
        raise ValueError("prompts must be non-empty and all of the same length (no padding)")
    if max_new_tokens <= 0 or steps <= 0 or block_size <= 0:
        raise ValueError("max_new_tokens, steps and block_size must be positive")
    batch = len(prompts)
    seeds = list(seeds) if seeds is not None else [None] * batch
    if len(seeds) != batch:
        raise ValueError("need one seed per prompt")
    generators = [make_generator(s) for s in seeds]
    device = model.device
    eos = torch.tensor(list(eos_ids), device=device)
    provider_cls = _CachedChunkLogits if impl == "cached" else _FullChunkLogits

    x = torch.tensor([list(p) for p in prompts], dtype=torch.long, device=device)
    prompt_len = x.shape[1]
    finished = [False] * batch
    num_forwards = [0] * batch
    spb = steps_per_block(max_new_tokens, steps, block_size)
    generated = 0
    while generated < max_new_tokens and not all(finished):
        T = x.shape[1]
        cur = min(first_chunk_len(T, block_size), max_new_tokens - generated)
        logits_of = provider_cls(model, x, block_size=block_size, cfg_scale=cfg_scale, mask_id=mask_id)
        x = torch.cat([x, torch.full((batch, cur), mask_id, dtype=torch.long, device=device)], dim=1)
        chunk_done = [False] * batch
        for k in commit_schedule(cur, spb):
            logits = logits_of(x[:, T:])
            for b in range(batch):
                if finished[b] or chunk_done[b]:
                    continue
                x[b, T:] = commit_step(
                    logits[b],
                    x[b, T:],
                    k,
                    temperature=temperature,
                    remasking=remasking,
                    mask_id=mask_id,
                    generator=generators[b],
                    threshold=threshold,
                    factor=factor,
                    rules=rules,
                    prefix=x[b, prompt_len:T].tolist(),
                )
                num_forwards[b] += 1
                finished[b] = bool(torch.isin(x[b, T:], eos).any())
                chunk_done[b] = not bool((x[b, T:] == mask_id).any())
            if all(f or d for f, d in zip(finished, chunk_done)):
                break
        generated += cur
    if forwards is not None:
        forwards[:] = num_forwards
    return [truncate_after_eos(x[b, prompt_len:].tolist(), eos_ids) for b in range(batch)]


def generate_bd3lm(
    model,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    steps: int,
    block_size: int = 32,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    cfg_scale: float = 0.0,
    mask_id: int = MASK_ID,
    eos_ids: Sequence[int] = EOS_IDS,
    seed: int | None = None,
    impl: str = "cached",
    threshold: float | None = None,
    factor: float | None = None,
    rules=None,
    forwards: list[int] | None = None,
) -> list[int]:
    """Generate for one prompt with the card's semantics (see the module docstring).

    Returns the generated tokens (everything after the prompt): cut right after the first token in
    ``eos_ids`` (inclusive; mask ids may precede it when the sequence stopped mid-chunk), otherwise exactly
    ``max_new_tokens`` tokens.
    """
    return generate_bd3lm_batch(
        model,
        [prompt_ids],
        max_new_tokens=max_new_tokens,
        steps=steps,
        block_size=block_size,
        temperature=temperature,
        remasking=remasking,
        cfg_scale=cfg_scale,
        mask_id=mask_id,
        eos_ids=eos_ids,
        seeds=[seed],
        impl=impl,
        threshold=threshold,
        factor=factor,
        rules=rules,
        forwards=forwards,
    )[0]


@torch.no_grad()
def generate_bd3lm_left_frontier(
    model,
    prompt_ids: Sequence[int],
    grammar,
    *,
    max_new_tokens: int,
    steps: int,
    block_size: int = 32,
    mask_id: int = MASK_ID,
    stop_ids: Sequence[int] = EOS_IDS,
    threshold: float | None = None,
    factor: float | None = None,
    forwards: list[int] | None = None,
) -> list[int]:
    """Greedy BD3LM under a grammar, with left-frontier commits (docs/design.md §15), from the rule:

    each step the leftmost masked position's logits are masked to ``grammar.allowed(output)`` (a bool
    ``[vocab]``; ``output`` = the tokens generated so far plus the chunk's accepted frontier); the step's
    rule (the card's count, ``threshold``, ``factor``) selects positions by confidence as without a grammar,
    and the step commits the leftmost masked position, then each next masked one while the rule selected
    it; the chunk's committed left part is then cut at the first token the grammar rejects
    (``grammar.valid_prefix(output_before_chunk, tokens)``), the rest masked again. A chunk ends when its
    accepted part fills it or holds a stop id; past the card's schedule each step uses its last count.
    Returns the generated tokens, cut after the first stop id (inclusive).
    """
    device = model.device
    spb = steps_per_block(max_new_tokens, steps, block_size)
    x = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    out: list[int] = []
    num_forwards = 0
    while len(out) < max_new_tokens:
        T = x.shape[1]
        cur = min(first_chunk_len(T, block_size), max_new_tokens - len(out))
        logits_of = _CachedChunkLogits(model, x, block_size=block_size, cfg_scale=0.0, mask_id=mask_id)
        chunk = torch.full((cur,), mask_id, dtype=torch.long, device=device)
        schedule = list(commit_schedule(cur, spb))
        accepted: list[int] = []
        for step in itertools.count():
            k = schedule[min(step, len(schedule) - 1)]
            logits = logits_of(chunk[None])[0].float()
            masked = chunk == mask_id
            first = int(masked.nonzero()[0])
            allowed = grammar.allowed(out + accepted).to(device)
            logits[first] = logits[first].masked_fill(~allowed, -math.inf)
            x0 = logits.argmax(dim=-1)
            conf = F.softmax(logits, dim=-1).gather(-1, x0[:, None]).squeeze(-1)
            conf = torch.where(masked, conf, torch.full_like(conf, -math.inf))
            n = commit_count(conf, k, threshold, factor)
            selected = torch.zeros(cur, dtype=torch.bool, device=device)
            selected[torch.sort(conf, descending=True, stable=True).indices[:n]] = True
            for i in masked.nonzero().flatten().tolist():
                if i != first and not selected[i]:
                    break
                chunk[i] = x0[i]
            num_forwards += 1
            left = []
            for t in chunk.tolist():
                if t == mask_id:
                    break
                left.append(t)
            accepted = grammar.valid_prefix(out, left)
            chunk = torch.full((cur,), mask_id, dtype=torch.long, device=device)
            chunk[: len(accepted)] = torch.tensor(accepted, dtype=torch.long, device=device)
            if len(accepted) == cur or any(t in stop_ids for t in accepted):
                break
        out += accepted
        if any(t in stop_ids for t in accepted):
            break
        x = torch.cat([x, chunk[None]], dim=1)
    if forwards is not None:
        forwards[:] = [num_forwards]
    return truncate_after_eos(out, stop_ids)[:max_new_tokens]
