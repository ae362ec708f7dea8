"""BD3LM (dLLM block diffusion) denoising rules, as defined by the seed card's ``generate()``."""

from __future__ import annotations

import math

import torch

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
    if temperature == 0:
        return logits.argmax(dim=-1)
    rows = logits.shape[0] if chunk_len is None else chunk_len
    u = torch.rand((rows, logits.shape[-1]), dtype=torch.float64, generator=generator, device=logits.device)
    if positions is not None:
        u = u[positions.to(logits.device)]
    return (logits.to(torch.float64) - temperature * torch.log(-torch.log(u))).argmax(dim=-1)


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
) -> torch.Tensor:
    """One BD3LM step on a chunk: commit the ``num_commits`` most confident masked positions.

    ``logits``: [len(positions), vocab], the logits at canvas ``positions`` (default: every
    position; no shift, position i predicts token i). ``positions`` must cover every masked
    position: only those can commit, so callers may skip the lm_head elsewhere. Committed tokens
    never change. Random draws, in order, always for the whole chunk: the Gumbel noise
    (temperature > 0), then the random confidences (``remasking="random"``).
    """
    if positions is None:
        positions = torch.arange(canvas.shape[0])
    step = ChunkStep(canvas, positions, num_commits, temperature, remasking, generator)
    return denoise_batch(logits, [step], mask_id)[0]


class ChunkStep:
    """One request's share of a batched denoising step (see :func:`denoise_batch`)."""

    __slots__ = ("canvas", "positions", "num_commits", "temperature", "remasking", "generator")

    def __init__(self, canvas, positions, num_commits, temperature=0.0, remasking="low_confidence",
                 generator=None):
        self.canvas = canvas  # [chunk_len] int64, CPU
        self.positions = positions  # [n] int64, CPU: canvas positions that have a logits row
        self.num_commits = num_commits
        self.temperature = temperature
        self.remasking = remasking
        self.generator = generator


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


def denoise_batch(logits: torch.Tensor, steps: list[ChunkStep], mask_id: int) -> list[torch.Tensor]:
    """:func:`denoise_step` for many chunks at once; ``logits`` rows follow ``steps`` in order.

    The vocabulary-wide work (argmax, log-sum-exp) runs once over all rows on the logits' device
    and only ``x0``/confidence per row come back to the CPU (one sync per step), which is what
    keeps a 32-request GPU batch from paying 32 round trips. Each request draws from its own
    generator, so batching never changes a request's result. Canvases and positions are CPU
    tensors; the confidence is ``softmax(logits)[x0]``.
    """
    x0 = logits.argmax(dim=-1)
    offsets = [0]
    for step in steps:
        offsets.append(offsets[-1] + len(step.positions))
    for i, step in enumerate(steps):
        if step.temperature > 0 and len(step.positions):
            rows = logits[offsets[i] : offsets[i + 1]]
            x0[offsets[i] : offsets[i + 1]] = gumbel_argmax(
                rows, step.temperature, step.generator, step.positions, step.canvas.shape[0]
            )
    confidence = _chosen_probability(logits, x0)
    x0_cpu, confidence_cpu = x0.cpu(), confidence.cpu()

    out = []
    for i, step in enumerate(steps):
        canvas = step.canvas
        masked = canvas[step.positions] == mask_id
        if not bool(masked.any()):
            out.append(canvas)
            continue
        if step.remasking == "low_confidence":
            conf = confidence_cpu[offsets[i] : offsets[i + 1]]
        elif step.remasking == "random":
            conf = torch.rand((canvas.shape[0],), generator=step.generator,
                              device=logits.device)[step.positions.to(logits.device)].cpu()
        else:
            raise ValueError(f"unknown remasking {step.remasking!r}; expected one of {REMASKING_MODES}")
        conf = torch.where(masked, conf, torch.full_like(conf, -math.inf))
        k = min(step.num_commits, int(masked.sum()))
        chosen = torch.topk(conf, k).indices
        new = canvas.clone()
        new[step.positions[chosen]] = x0_cpu[offsets[i] : offsets[i + 1]][chosen]
        out.append(new)
    return out
