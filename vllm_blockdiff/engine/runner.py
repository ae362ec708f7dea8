"""Model-runner side of block diffusion: canvases in the input, segments in attention, commits out.

Per step, for every request the scheduler gave canvas slots (``scheduled_spec_decode_tokens``,
placeholders of the chunk's mask slots):
1. the request's current canvas (masks and tokens committed so far in this chunk) replaces the
   placeholders in the input ids;
2. attention rows become segments (``segments.StepPlan``) so each token sees exactly the
   block-causal context;
3. logits are computed only at still-masked canvas positions; the denoising policy commits;
4. the canvas is returned to the scheduler only when the chunk is finished (it ran all its
   steps, or the request's eos appeared), as that step's sampled tokens; otherwise nothing.

The canvas lives here, in ``self._states``, because the runner already caches committed tokens
itself (``_bookkeeping_sync``): what it reports is exactly what the scheduler appends.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from vllm.v1.outputs import SamplerOutput

from vllm_blockdiff.algorithms import bd3lm
from vllm_blockdiff.config import model_defaults
from vllm_blockdiff.engine.segments import (
    CanvasRow,
    StepPlan,
    add_block_causal_segments,
    segmented_metadata,
)
from vllm_blockdiff.options import BD3LMOptions, resolve_bd3lm_options

@dataclass
class ChunkState:
    """One request's chunk being denoised."""

    start: int  # absolute position of the chunk's first slot
    canvas: torch.Tensor  # [chunk_len] int64, mask ids where not yet committed
    commits: list[int]  # tokens to commit at each remaining step (the card's uniform split)


@dataclass
class RequestState:
    options: BD3LMOptions
    generator: torch.Generator
    eos_token_id: int | None
    chunk: ChunkState | None = None


class BlockDiffRunnerMixin:
    """Mixed into vLLM's (CPU or GPU) V1 model runner; see the module docstring."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._defaults = model_defaults(self.vllm_config)
        self._states: dict[str, RequestState] = {}
        self._plan: StepPlan | None = None

    # ---- request state -------------------------------------------------------------------
    def _state(self, req_id: str) -> RequestState:
        state = self._states.get(req_id)
        if state is None:
            params = self.requests[req_id].sampling_params
            options = resolve_bd3lm_options(params, self._defaults)
            generator = torch.Generator(device=self.device)
            # Unseeded requests get a seed derived from the (unique) request id, not from entropy:
            # every tensor-parallel rank samples on its own and must draw the same numbers.
            seed = options.seed
            if seed is None:
                seed = int.from_bytes(hashlib.sha256(req_id.encode()).digest()[:8], "little")
            generator.manual_seed(seed)
            state = RequestState(options, generator, params.eos_token_id)
            self._states[req_id] = state
        return state

    def _update_states(self, scheduler_output):
        for req_id in scheduler_output.finished_req_ids:
            self._states.pop(req_id, None)
        result = super()._update_states(scheduler_output)
        # Put each canvas where the scheduler left placeholders.
        batch = self.input_batch
        for req_id, placeholders in scheduler_output.scheduled_spec_decode_tokens.items():
            req_index = batch.req_id_to_index[req_id]
            start = int(batch.num_tokens_no_spec[req_index])
            state = self._state(req_id)
            if state.chunk is None or state.chunk.start != start:
                schedule = bd3lm.transfer_schedule(len(placeholders), state.options.steps_per_block)
                state.chunk = ChunkState(start, torch.tensor(placeholders, dtype=torch.long), schedule)
            canvas = state.chunk.canvas
            batch.token_ids_cpu[req_index, start : start + len(canvas)] = canvas.numpy()
        return result

    # ---- inputs and attention --------------------------------------------------------------
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens: np.ndarray):
        super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        batch = self.input_batch
        plan = StepPlan()
        offset = 0
        spec = scheduler_output.scheduled_spec_decode_tokens
        for req_index, req_id in enumerate(batch.req_ids):
            num_sched = int(num_scheduled_tokens[req_index])
            computed = int(batch.num_computed_tokens_cpu[req_index])
            block_size = self._state(req_id).options.block_size
            num_canvas = len(spec.get(req_id, ()))
            regular_end = computed + num_sched - num_canvas
            add_block_causal_segments(plan, req_index, computed, regular_end, block_size)
            if num_canvas:
                plan.add(req_index, num_canvas, regular_end + num_canvas, causal=False)
                canvas = self._states[req_id].chunk.canvas
                masked = np.flatnonzero(canvas.numpy() == self._defaults.mask_token_id)
                plan.canvases.append(
                    CanvasRow(req_index, req_id, offset + num_sched - num_canvas, num_canvas, masked)
                )
            offset += num_sched
        self._plan = plan
        logits_indices = torch.from_numpy(plan.logits_indices()).to(self.device)
        max_canvas = max((c.length for c in plan.canvases), default=1)
        return logits_indices, None, max_canvas

    def initialize_metadata_builders(self, *args, **kwargs):
        super().initialize_metadata_builders(*args, **kwargs)
        for groups in self.attn_groups:
            for group in groups:
                for builder in group.metadata_builders:
                    self._wrap_builder(builder)

    def _wrap_builder(self, builder) -> None:
        if getattr(builder, "_blockdiff_wrapped", False):
            return
        build = builder.build

        def build_segments(common_prefix_len, common_attn_metadata, *args, **kwargs):
            if self._plan is not None:
                common_attn_metadata = segmented_metadata(common_attn_metadata, self._plan)
            return build(common_prefix_len, common_attn_metadata, *args, **kwargs)

        builder.build = build_segments
        builder._blockdiff_wrapped = True

    def execute_model(self, *args, **kwargs):
        try:
            return super().execute_model(*args, **kwargs)
        finally:
            # The plan belongs to this forward only (dummy and profiling runs have none);
            # sampling, which runs next, reads it from ``_sampling_plan``.
            self._sampling_plan, self._plan = self._plan, None

    # ---- sampling: the denoising step ---------------------------------------------------------
    def _sample(self, logits, spec_decode_metadata):
        plan = getattr(self, "_sampling_plan", None)
        self._sampling_plan = None
        if plan is None:
            return super()._sample(logits, spec_decode_metadata)
        num_reqs = self.input_batch.num_reqs
        width = max([2] + [c.length for c in plan.canvases])
        out = torch.full((num_reqs, width), -1, dtype=torch.int32)
        mask_id = self._defaults.mask_token_id
        steps = []
        for canvas_row in plan.canvases:
            state = self._states[canvas_row.req_id]
            # The card runs a fixed number of steps: a position may "commit" the mask id itself
            # and stay masked, so completion is counted in steps, not in masks left.
            steps.append(
                bd3lm.ChunkStep(
                    state.chunk.canvas,
                    torch.from_numpy(canvas_row.logit_positions),
                    state.chunk.commits.pop(0),
                    state.options.temperature,
                    state.options.remasking,
                    state.generator,
                )
            )
        new_canvases = bd3lm.denoise_batch(logits, steps, mask_id) if steps else []
        for canvas_row, canvas in zip(plan.canvases, new_canvases):
            state = self._states[canvas_row.req_id]
            state.chunk.canvas = canvas
            hit_eos = state.eos_token_id is not None and bool((canvas == state.eos_token_id).any())
            if not state.chunk.commits or hit_eos:
                out[canvas_row.req_index, : canvas_row.length] = canvas.to(torch.int32)
                state.chunk = None
        return SamplerOutput(sampled_token_ids=out.to(self.device), logprobs_tensors=None)
