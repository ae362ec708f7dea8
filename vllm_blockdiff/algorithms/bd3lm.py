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


def commit_counts(sorted_confidence: torch.Tensor, num_masked: torch.Tensor, schedule: torch.Tensor,
                  threshold: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """How many of each chunk's masked positions commit this step (``[N]``), batched.

    ``sorted_confidence`` ``[N, B]``: each chunk's masked confidences in descending order, ``-inf``
    padded; ``schedule``: the card's count this step; ``threshold``/``factor``: the rules' parameters,
    ``nan`` where a request uses neither (then exactly the card's count).
    """
    count = torch.minimum(schedule, num_masked)
    above = (sorted_confidence > threshold[:, None]).sum(dim=1)  # nan compares False
    n = torch.arange(1, sorted_confidence.shape[1] + 1, device=sorted_confidence.device)
    fits = (n + 1) * (1 - sorted_confidence) < factor[:, None]
    leading = torch.cumprod(fits.to(torch.int64), dim=1).sum(dim=1)
    return torch.minimum(torch.maximum(count, torch.maximum(above, leading)), num_masked)


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

    canvas: torch.Tensor  # [chunk_len] int64, CPU
    positions: torch.Tensor  # [n] int64, CPU: canvas positions that have a logits row (the masked ones)
    num_commits: int  # the card's count this step
    temperature: float = 0.0
    remasking: str = "low_confidence"
    generator: torch.Generator | None = None
    threshold: float | None = None
    factor: float | None = None
    constraints: VocabConstraints | None = None
    output_start: int = 0  # output position of the chunk's first slot (min_tokens, bad words)
    output: list[int] | None = None  # the output tokens before the chunk (multi-token bad words only)


@dataclass
class StepResult:
    canvases: list[torch.Tensor]  # each request's canvas after the step (CPU)
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
    step = ChunkStep(canvas, positions, num_commits, temperature, remasking, generator, threshold, factor)
    return denoise_batch(logits, [step], mask_id).canvases[0]


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

    The vocabulary-wide work (constraints, argmax, softmax) and the commit rules run batched on the
    logits' device, with one device-to-host copy of the new canvases at the end. What stays per
    request is what must: its own generator's draws (Gumbel noise, random confidences, drawn
    exactly as the card draws them, so batching never changes a result) and the bad-word checks
    of requests that have multi-token bad words.
    """
    device = logits.device
    num = len(steps)
    rows_per = np.array([len(s.positions) for s in steps], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(rows_per)])
    width = max(len(s.canvas) for s in steps)
    canvases = np.full((num, width), mask_id, dtype=np.int64)
    for i, step in enumerate(steps):
        canvases[i, : len(step.canvas)] = step.canvas.numpy()
    row_req = torch.from_numpy(np.repeat(np.arange(num), rows_per)).to(device)
    row_pos = torch.from_numpy(np.concatenate([s.positions.numpy() for s in steps])).to(device)

    scores_of = {}  # request -> the scores its x0 came from, for bad-word re-choices
    constrained = [i for i, s in enumerate(steps) if s.constraints is not None and rows_per[i]]
    if constrained:
        logits = logits.float().clone()
        for i in constrained:
            step, rows = steps[i], slice(offsets[i], offsets[i + 1])
            seq = _output_sequence(step, canvases[i, : len(step.canvas)], mask_id)
            indices = (step.output_start + step.positions.numpy()).tolist()
            logits[rows] = step.constraints.apply(logits[rows], seq, indices)
    x0 = logits.argmax(dim=-1)
    for i, step in enumerate(steps):
        if step.temperature > 0 and rows_per[i]:
            rows = slice(offsets[i], offsets[i + 1])
            scores = perturbed_scores(logits[rows], step.temperature, step.generator, step.positions,
                                      step.canvas.shape[0])
            x0[rows] = scores.argmax(dim=-1)
            if step.constraints is not None and step.constraints.sequences:
                scores_of[i] = scores
    confidence = _chosen_probability(logits, x0)
    for i, step in enumerate(steps):
        if step.remasking == "random" and rows_per[i]:
            draws = torch.rand((step.canvas.shape[0],), generator=step.generator, device=device)
            confidence[offsets[i] : offsets[i + 1]] = draws[step.positions.to(device)]
        elif step.remasking not in REMASKING_MODES:
            raise ValueError(f"unknown remasking {step.remasking!r}; expected one of {REMASKING_MODES}")

    current = torch.from_numpy(canvases).to(device)
    conf = torch.full((num, width), -math.inf, device=device)
    conf[row_req, row_pos] = confidence
    conf = torch.where(current == mask_id, conf, -math.inf)  # committed positions never change
    proposal = torch.zeros((num, width), dtype=torch.int64, device=device)
    proposal[row_req, row_pos] = x0
    sorted_conf, order = torch.sort(conf, dim=1, descending=True, stable=True)

    def column(values, fill=math.nan):
        return torch.tensor([fill if v is None else v for v in values], dtype=torch.float32, device=device)

    counts = commit_counts(
        sorted_conf, torch.isfinite(conf).sum(dim=1), column([s.num_commits for s in steps]).long(),
        column([s.threshold for s in steps]), column([s.factor for s in steps]),
    )
    chosen = torch.arange(width, device=device)[None, :] < counts[:, None]
    commit = torch.zeros((num, width), dtype=torch.bool, device=device).scatter_(1, order, chosen)
    new = torch.where(commit, proposal, current)
    for i, step in enumerate(steps):
        if step.constraints is not None and step.constraints.sequences and rows_per[i]:
            new[i] = _recheck_bad_words(step, new[i], current[i], order[i, : int(counts[i])], proposal[i],
                                        logits[offsets[i] : offsets[i + 1]], scores_of.get(i), mask_id)
    new_cpu, counts_cpu = new.cpu(), counts.cpu().tolist()
    return StepResult([new_cpu[i, : len(s.canvas)] for i, s in enumerate(steps)], counts_cpu)


def _recheck_bad_words(step: ChunkStep, new: torch.Tensor, current: torch.Tensor, committed: torch.Tensor,
                       proposal: torch.Tensor, logits: torch.Tensor, scores: torch.Tensor | None,
                       mask_id: int) -> torch.Tensor:
    """Commits of one step placed one by one in confidence order; a token that would complete a
    multi-token bad word with the tokens placed so far is replaced by its row's best allowed one."""
    n = len(step.canvas)
    canvas = current[:n].cpu().numpy().copy()
    row_of = {int(p): r for r, p in enumerate(step.positions.tolist())}
    start = step.output_start
    scores = logits if scores is None else scores
    for position in committed.tolist():
        seq = _output_sequence(step, canvas, mask_id)
        token = int(proposal[position])
        banned = step.constraints.banned_at(seq, start + position)
        if token in banned:
            row = scores[row_of[position]].clone()
            row[list(banned)] = -math.inf
            token = int(row.argmax())
        canvas[position] = token
    out = new.clone()
    out[:n] = torch.from_numpy(canvas).to(out.device)
    return out
