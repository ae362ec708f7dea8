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


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """``argmax(exp(logits) / (-log u) ** temperature)`` in float64, the card's Gumbel-max sampling.

    Computed as ``logits - temperature * log(-log u)`` (same argmax, no overflow).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    u = torch.rand(logits.shape, dtype=torch.float64, generator=generator, device=logits.device)
    noisy = logits.to(torch.float64) - temperature * torch.log(-torch.log(u))
    return noisy.argmax(dim=-1)


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
    never change. Random draws, in order, always for the whole chunk so the stream does not depend
    on ``positions``: the Gumbel noise (temperature > 0), then the random confidences.
    """
    masked = canvas == mask_id
    if not bool(masked.any()):
        return canvas
    chunk_len = canvas.shape[0]
    if positions is None:
        positions = torch.arange(chunk_len, device=canvas.device)
    if temperature == 0:
        x0 = logits.argmax(dim=-1)
    else:
        u = torch.rand((chunk_len, logits.shape[-1]), dtype=torch.float64, generator=generator,
                       device=logits.device)[positions]
        x0 = (logits.to(torch.float64) - temperature * torch.log(-torch.log(u))).argmax(dim=-1)
    if remasking == "low_confidence":
        probs = torch.softmax(logits.float(), dim=-1)
        confidence = probs.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    elif remasking == "random":
        confidence = torch.rand((chunk_len,), generator=generator, device=logits.device)[positions]
    else:
        raise ValueError(f"unknown remasking {remasking!r}; expected one of {REMASKING_MODES}")
    confidence = torch.where(masked[positions], confidence, torch.full_like(confidence, -math.inf))
    k = min(num_commits, int(masked.sum()))
    chosen = torch.topk(confidence, k).indices
    out = canvas.clone()
    out[positions[chosen]] = x0[chosen].to(out.dtype)
    return out


def cfg_logits(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance as the card mixes it: ``un + (scale + 1) * (cond - un)``."""
    return uncond + (cfg_scale + 1.0) * (cond - uncond)


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


def denoise_batch(logits: torch.Tensor, steps: list[ChunkStep], mask_id: int) -> list[torch.Tensor]:
    """:func:`denoise_step` for many chunks at once; ``logits`` rows follow ``steps`` in order.

    The vocabulary-wide work (argmax, log-sum-exp) runs once over all rows on the logits' device
    and only ``x0``/confidence per row come back to the CPU (one sync per step), which is what
    keeps a 32-request GPU batch from paying 32 round trips. Random draws per request and in the
    same order as :func:`denoise_step`, so results are identical.
    """
    x0 = logits.argmax(dim=-1)
    offsets = [0]
    for step in steps:
        offsets.append(offsets[-1] + len(step.positions))
    for i, step in enumerate(steps):
        if step.temperature > 0 and len(step.positions):
            rows = logits[offsets[i] : offsets[i + 1]]
            chunk_len = step.canvas.shape[0]
            u = torch.rand((chunk_len, logits.shape[-1]), dtype=torch.float64, generator=step.generator,
                           device=logits.device)[step.positions.to(logits.device)]
            x0[offsets[i] : offsets[i + 1]] = (rows.to(torch.float64) - step.temperature * torch.log(-torch.log(u))).argmax(-1)
    logits32 = logits.float()
    confidence = torch.exp(logits32.gather(-1, x0.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits32, dim=-1))
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
