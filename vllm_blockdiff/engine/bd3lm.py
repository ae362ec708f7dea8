"""BD3LM in the model runner: the canvas in the input, block-causal segments, batched denoising.

Per step, for every request the scheduler gave canvas slots (``scheduled_spec_decode_tokens``,
placeholders of the chunk's mask slots):
1. the request's current canvas (masks and tokens committed so far in this chunk) replaces the
   placeholders in the input ids;
2. its query is cut into block-causal segments plus the canvas segment (``segments.py``);
3. logits are computed only at still-masked canvas positions; the denoising policy commits;
4. the canvas is returned to the scheduler only when the chunk is finished (it ran all its
   steps, or the request's eos appeared), as that step's sampled tokens; otherwise nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vllm_blockdiff.algorithms import bd3lm
from vllm_blockdiff.engine.segments import CanvasRow, StepPlan, add_block_causal_segments
from vllm_blockdiff.options import BD3LMOptions, ModelDefaults, resolve_bd3lm_options


@dataclass
class ChunkState:
    """One request's chunk being denoised."""

    start: int  # absolute position of the chunk's first slot
    canvas: torch.Tensor  # [chunk_len] int64, mask ids where not yet committed
    commits: list[int]  # tokens to commit at each remaining step (the card's uniform split)


@dataclass
class BD3LMRequestState:
    options: BD3LMOptions
    generator: torch.Generator
    eos_token_id: int | None
    chunk: ChunkState | None = None


class BD3LMSteps:
    """The BD3LM family's part of :class:`~vllm_blockdiff.engine.runner.BlockDiffRunnerMixin`."""

    def __init__(self, defaults: ModelDefaults, vllm_config):
        self.defaults = defaults
        self.mask_id = defaults.mask_token_id

    def kv_cache_ready(self, kv_cache_config) -> None:
        """BD3LM keeps everything in the request's own pages."""

    def new_state(self, params, generator: torch.Generator) -> BD3LMRequestState:
        return BD3LMRequestState(resolve_bd3lm_options(params, self.defaults), generator, params.eos_token_id)

    def place(self, token_ids: np.ndarray, start: int, placeholders: list[int], state: BD3LMRequestState):
        """Write the canvas over the placeholders (a new chunk starts as the placeholders: masks)."""
        if state.chunk is None or state.chunk.start != start:
            schedule = bd3lm.transfer_schedule(len(placeholders), state.options.steps_per_block)
            state.chunk = ChunkState(start, torch.tensor(placeholders, dtype=torch.long), schedule)
        token_ids[start : start + len(placeholders)] = state.chunk.canvas.numpy()

    def plan(self, plan: StepPlan, req_index: int, req_id: str, state: BD3LMRequestState,
             computed: int, num_sched: int, num_masks: int, offset: int, token_ids: np.ndarray) -> None:
        block_size = state.options.block_size
        regular_end = computed + num_sched - num_masks
        add_block_causal_segments(plan, req_index, computed, regular_end, block_size)
        if num_masks:
            plan.add(req_index, num_masks, regular_end + num_masks, causal=False)
            masked = np.flatnonzero(state.chunk.canvas.numpy() == self.mask_id)
            plan.canvases.append(CanvasRow(req_index, req_id, offset + num_sched - num_masks, num_masks, masked))

    def sample(self, logits: torch.Tensor, plan: StepPlan, states: dict, out: torch.Tensor,
               num_tokens: np.ndarray) -> None:
        """One batched denoising step; finished chunks are written to ``out`` rows."""
        steps = []
        for row in plan.canvases:
            state = states[row.req_id]
            # The card runs a fixed number of steps: a position may "commit" the mask id itself
            # and stay masked, so completion is counted in steps, not in masks left.
            steps.append(
                bd3lm.ChunkStep(
                    state.chunk.canvas,
                    torch.from_numpy(row.logit_positions),
                    state.chunk.commits.pop(0),
                    state.options.temperature,
                    state.options.remasking,
                    state.generator,
                )
            )
        new_canvases = bd3lm.denoise_batch(logits, steps, self.mask_id) if steps else []
        for row, canvas in zip(plan.canvases, new_canvases):
            state = states[row.req_id]
            state.chunk.canvas = canvas
            hit_eos = state.eos_token_id is not None and bool((canvas == state.eos_token_id).any())
            if not state.chunk.commits or hit_eos:
                out[row.req_index, : row.length] = canvas.to(torch.int32)
                state.chunk = None
