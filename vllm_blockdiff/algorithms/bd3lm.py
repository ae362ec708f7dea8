"""BD3LM (dLLM block diffusion) denoising rules: the seed card's ``generate()`` and parallel decoding.

The card commits a fixed number of tokens per step (a uniform split of the chunk over its steps):
the ``k`` most confident still-masked positions. Two published parallel-decoding rules (Fast-dLLM)
commit more when the model is sure, never fewer than the card's ``k`` (so ``steps`` stays the
worst case per block); a chunk ends as soon as it has no mask left:

- ``threshold`` τ: every masked position whose confidence exceeds τ;
- ``factor`` f: the n most confident masked positions, for the largest n with
  ``(n + 1) * (1 - c_n) < f`` (``c_1 >= c_2 >= ...`` the sorted confidences), at least one.

Confidence is ``softmax(logits)[x0]`` (``low_confidence``) or uniform noise (``random``), where
``x0 = argmax(logits + temperature * Gumbel)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from vllm_blockdiff.algorithms.constraints import UNKNOWN, VocabConstraints

REMASKING_MODES = ("low_confidence", "random")


def steps_per_block(steps: int, max_new_tokens: int, block_size: int) -> int:
    """The card's per-block step budget: ``ceil(steps / ceil(max_new_tokens / block_size))``."""
    return math.ceil(steps / math.ceil(max_new_tokens / block_size))


def first_chunk_len(num_tokens: int, block_size: int) -> int:
    """Masks needed to reach the next block boundary (a whole block when aligned)."""
    return block_size - num_tokens % block_size


def next_chunk_len(num_tokens: int, num_generated: int, max_new_tokens: int, block_size: int) -> int:
    """Length of the chunk that starts at ``num_tokens``: completes the block, capped by what is left."""
    return min(first_chunk_len(num_tokens, block_size), max_new_tokens - num_generated)


def transfer_schedule(num_masks: int, num_steps: int) -> list[int]:
    """Tokens committed at each step: a uniform split, earlier steps take the remainder.

    Steps that would commit nothing are dropped (they cannot change the output).
    """
    base, rem = divmod(num_masks, num_steps)
    counts = [base + (1 if i < rem else 0) for i in range(num_steps)]
    return [c for c in counts if c > 0]


def commit_counts(sorted_confidence: np.ndarray, num_masked: np.ndarray, schedule: np.ndarray,
                  threshold: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """How many of each chunk's masked positions commit this step (``[N]``), batched.

    ``sorted_confidence`` ``[N, B]`` (float32): each chunk's masked confidences in descending order,
    ``-inf`` padded; ``schedule``: the card's count this step; ``threshold``/``factor``: the rules'
    parameters, ``nan`` where a request uses neither (then exactly the card's count). The threshold is
    compared in float32 (as the confidence is), the factor rule in float64.
    """
    count = np.minimum(schedule, num_masked)
    above = (sorted_confidence > threshold.astype(np.float32)[:, None]).sum(axis=1)  # nan compares False
    n = np.arange(1, sorted_confidence.shape[1] + 1)
    fits = (n + 1) * (1 - sorted_confidence.astype(np.float64)) < factor[:, None]
    leading = np.cumprod(fits, axis=1).sum(axis=1)
    return np.minimum(np.maximum(count, np.maximum(above, leading)), num_masked)


def gumbel_argmax(
    logits: torch.Tensor,
    temperature: float,
    generator: torch.Generator | None,
    positions: torch.Tensor | None = None,
    chunk_len: int | None = None,
) -> torch.Tensor:
    """``argmax(exp(logits) / (-log u) ** temperature)`` in float64, the card's Gumbel-max sampling.

    Computed as ``logits - temperature * log(-log u)`` (same argmax, no overflow). The noise is
    drawn for the whole chunk (``chunk_len`` rows) and the rows at ``positions`` are used, so the
    random stream does not depend on which positions have logits.
    """
    return perturbed_scores(logits, temperature, generator, positions, chunk_len).argmax(dim=-1)


def perturbed_scores(logits, temperature, generator, positions=None, chunk_len=None) -> torch.Tensor:
    """The scores whose argmax is :func:`gumbel_argmax` (the logits themselves at temperature 0)."""
    if temperature == 0:
        return logits
    rows = logits.shape[0] if chunk_len is None else chunk_len
    u = torch.rand((rows, logits.shape[-1]), dtype=torch.float64, generator=generator, device=logits.device)
    if positions is not None:
        u = u[positions.to(logits.device)]
    return logits.to(torch.float64) - temperature * torch.log(-torch.log(u))


@dataclass
class ChunkStep:
    """One request's share of a batched denoising step (see :func:`denoise_batch`)."""

    canvas: np.ndarray  # [chunk_len] int64
    positions: np.ndarray  # [n] int64: canvas positions that have a logits row (the masked ones)
    num_commits: int  # the card's count this step
    temperature: float = 0.0
    remasking: str = "low_confidence"
    generator: torch.Generator | None = None
    threshold: float | None = None
    factor: float | None = None
    constraints: VocabConstraints | None = None
    output_start: int = 0  # output position of the chunk's first slot (min_tokens, bad words)
    output: list[int] | None = None  # the output tokens before the chunk (multi-token bad words only)
    left_frontier: bool = False  # commit only a run from the leftmost mask (structured outputs)


@dataclass
class StepResult:
    canvases: np.ndarray  # [N, width] int64: each request's canvas after the step (its first len(canvas))
    committed: list[int]  # positions committed this step, per request


def denoise_step(
    logits: torch.Tensor,
    canvas: torch.Tensor,
    mask_id: int,
    num_commits: int,
    *,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    generator: torch.Generator | None = None,
    positions: torch.Tensor | None = None,
    threshold: float | None = None,
    factor: float | None = None,
) -> torch.Tensor:
    """One BD3LM step on a chunk: commit the ``num_commits`` most confident masked positions (or
    more, under ``threshold``/``factor``).

    ``logits``: [len(positions), vocab], the logits at canvas ``positions`` (default: every
    position; no shift, position i predicts token i). ``positions`` must cover every masked
    position: only those can commit, so callers may skip the lm_head elsewhere. Committed tokens
    never change. Random draws, in order, always for the whole chunk: the Gumbel noise
    (temperature > 0), then the random confidences (``remasking="random"``).
    """
    if positions is None:
        positions = torch.arange(canvas.shape[0])
    step = ChunkStep(canvas.numpy(), positions.numpy(), num_commits, temperature, remasking, generator, threshold,
                     factor)
    return torch.from_numpy(denoise_batch(logits, [step], mask_id).canvases[0, : len(canvas)].copy())


_SOFTMAX_ROWS = 256  # bounds the [rows, vocab] probability buffer (vocab ~152k: 155 MB in fp32)


def _chosen_probability(logits: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """``softmax(logits)[x0]`` per row, in row chunks.

    The fused softmax kernel is several times faster than ``exp(l - logsumexp(l))`` on CPU
    (measured: logsumexp took as long as the whole model), and it is what the card computes.
    """
    out = torch.empty(x0.shape, dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], _SOFTMAX_ROWS):
        rows = slice(start, start + _SOFTMAX_ROWS)
        probs = torch.softmax(logits[rows].float(), dim=-1)
        out[rows] = probs.gather(-1, x0[rows].unsqueeze(-1)).squeeze(-1)
    return out


def _output_sequence(step: ChunkStep, canvas: np.ndarray, mask_id: int) -> list[int]:
    """The request's output so far with the chunk appended, undecided positions ``UNKNOWN`` (the tokens
    before the chunk are ``UNKNOWN`` too unless the step carries them: only bad words read them)."""
    before = step.output if step.output is not None else [UNKNOWN] * step.output_start
    return list(before) + [UNKNOWN if t == mask_id else int(t) for t in canvas]


def denoise_batch(logits: torch.Tensor, steps: list[ChunkStep], mask_id: int) -> StepResult:
    """One denoising step for many chunks; ``logits`` rows follow ``steps`` (and their positions) in order.

    The vocabulary-wide work (constraints, argmax, softmax) runs batched on the logits' device; one
    device-to-host copy brings back each row's token and confidence, and the commit rules run on those
    for all chunks at once (vectorized: a ``[requests, width]`` matrix). What stays per request is what
    must: its own generator's draws (Gumbel noise, random confidences, drawn exactly as the card draws
    them, so batching never changes a result) and the bad-word checks of requests with multi-token bad
    words.
    """
    device = logits.device
    num = len(steps)
    rows_per = np.array([len(s.positions) for s in steps], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(rows_per)])
    width = max(len(s.canvas) for s in steps)
    canvases = np.full((num, width), mask_id, dtype=np.int64)
    for i, step in enumerate(steps):
        canvases[i, : len(step.canvas)] = step.canvas

    scores_of = {}  # request -> the scores its x0 came from, for bad-word re-choices
    constrained = [i for i, s in enumerate(steps) if s.constraints is not None and rows_per[i]]
    if constrained:
        logits = logits.float().clone()
        for i in constrained:
            step, rows = steps[i], slice(offsets[i], offsets[i + 1])
            seq = _output_sequence(step, canvases[i, : len(step.canvas)], mask_id)
            logits[rows] = step.constraints.apply(logits[rows], seq, (step.output_start + step.positions).tolist())
    x0 = logits.argmax(dim=-1)
    for i, step in enumerate(steps):
        if step.temperature > 0 and rows_per[i]:
            rows = slice(offsets[i], offsets[i + 1])
            scores = perturbed_scores(logits[rows], step.temperature, step.generator,
                                      torch.from_numpy(step.positions), len(step.canvas))
            x0[rows] = scores.argmax(dim=-1)
            if step.constraints is not None and step.constraints.sequences:
                scores_of[i] = scores
    confidence = _chosen_probability(logits, x0)
    for i, step in enumerate(steps):
        if step.remasking == "random" and rows_per[i]:
            draws = torch.rand((len(step.canvas),), generator=step.generator, device=device)
            confidence[offsets[i] : offsets[i + 1]] = draws[torch.from_numpy(step.positions).to(device)]
        elif step.remasking not in REMASKING_MODES:
            raise ValueError(f"unknown remasking {step.remasking!r}; expected one of {REMASKING_MODES}")
    # The one copy to the host: tokens (exact in float64) and confidences.
    rows = torch.stack([x0.to(torch.float64), confidence.to(torch.float64)]).cpu().numpy()

    row_req = np.repeat(np.arange(num), rows_per)
    row_pos = np.concatenate([s.positions for s in steps])
    conf = np.full((num, width), -np.inf, dtype=np.float32)
    conf[row_req, row_pos] = rows[1]
    conf[canvases != mask_id] = -np.inf  # committed positions never change
    proposal = canvases.copy()
    proposal[row_req, row_pos] = rows[0].astype(np.int64)
    order = np.argsort(-conf, axis=1, kind="stable")  # descending, ties toward the lower position
    sorted_conf = np.take_along_axis(conf, order, axis=1)

    def column(values):
        return np.array([math.nan if v is None else v for v in values], dtype=np.float64)

    counts = commit_counts(sorted_conf, np.isfinite(conf).sum(axis=1), np.array([s.num_commits for s in steps]),
                           column([s.threshold for s in steps]), column([s.factor for s in steps]))
    commit = np.zeros((num, width), dtype=bool)
    np.put_along_axis(commit, order, np.arange(width)[None, :] < counts[:, None], axis=1)
    placed = [order[i, : counts[i]] for i in range(num)]  # committed positions, in placement order
    for i, step in enumerate(steps):
        if step.left_frontier and rows_per[i]:
            placed[i] = left_frontier(commit[i], canvases[i, : len(step.canvas)] == mask_id)
            commit[i] = False
            commit[i, placed[i]] = True
            counts[i] = len(placed[i])
    new = np.where(commit, proposal, canvases)
    for i, step in enumerate(steps):
        if step.constraints is not None and step.constraints.sequences and rows_per[i]:
            _recheck_bad_words(step, new[i], canvases[i], placed[i], proposal[i],
                               logits[offsets[i] : offsets[i + 1]], scores_of.get(i), mask_id)
    return StepResult(new, counts.tolist())


def left_frontier(selected: np.ndarray, masked: np.ndarray) -> np.ndarray:
    """The positions a left-frontier step commits: the leftmost masked position, then each next masked
    position (left to right) while the step's rule ``selected`` it; ascending. Under a grammar this keeps
    the committed canvas a prefix the grammar can check (docs/design.md §15)."""
    positions = np.flatnonzero(masked)
    if not len(positions):
        return positions
    chosen = selected[positions]
    chosen[0] = True
    run = len(positions) if chosen.all() else int(np.argmin(chosen))
    return positions[:run]


def committed_prefix(canvas, mask_id: int) -> list[int]:
    """A canvas's tokens before its first mask (a left-frontier canvas's committed part)."""
    canvas = np.asarray(canvas)
    masks = np.flatnonzero(canvas == mask_id)
    return canvas[: masks[0] if len(masks) else len(canvas)].tolist()


def _recheck_bad_words(step: ChunkStep, new: np.ndarray, current: np.ndarray, committed: np.ndarray,
                       proposal: np.ndarray, logits: torch.Tensor, scores: torch.Tensor | None,
                       mask_id: int) -> None:
    """Commits of one step placed one by one in confidence order; a token that would complete a
    multi-token bad word with the tokens placed so far is replaced by its row's best allowed one.
    Writes ``new`` (the request's row of the step's result) in place."""
    n = len(step.canvas)
    canvas = current[:n].copy()
    row_of = {int(p): r for r, p in enumerate(step.positions.tolist())}
    scores = logits if scores is None else scores
    for position in committed.tolist():
        seq = _output_sequence(step, canvas, mask_id)
        token = int(proposal[position])
        banned = step.constraints.banned_at(seq, step.output_start + position)
        if token in banned:
            row = scores[row_of[position]].clone()
            row[list(banned)] = -math.inf
            token = int(row.argmax())
        canvas[position] = token
    new[:n] = canvas
