"""Model-runner side of block diffusion: mask slots in the input, segments in attention, commits out.

``BlockDiffRunnerMixin`` sits on vLLM's (CPU or GPU) V1 model runner and hands the family-specific
parts to a *steps* object (``engine/bd3lm.py``, ``engine/sdlm.py``):
- ``place``: what the mask slots hold this step (written over the scheduler's placeholders);
- ``plan``: how each request's query is cut into attention segments, and where logits are needed;
- ``sample``: the decoding policy, turning those logits into each request's committed tokens.

Per-request state (options, a ``torch.Generator``, the family's decoding state) lives here,
because the runner already caches committed tokens itself (``_bookkeeping_sync``): what it
reports is exactly what the scheduler appends. Committed tokens go back as a ``[num_reqs, W]``
sampled tensor padded with -1, which vLLM parses into variable-length per-request lists.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from vllm.v1.outputs import ModelRunnerOutput, SamplerOutput

from vllm_blockdiff.config import model_defaults
from vllm_blockdiff.engine.bd3lm import BD3LMSteps
from vllm_blockdiff.engine.sdlm import SDLMSteps
from vllm_blockdiff.engine.segments import StepPlan, segmented_metadata

FAMILY_STEPS = {"bd3lm": BD3LMSteps, "sdlm": SDLMSteps}


def request_generator(req_id: str, seed: int | None, device) -> torch.Generator:
    """The request's own generator, seeded from ``seed`` or else from the (unique) request id.

    Not from entropy: every tensor-parallel rank samples on its own and must draw the same numbers.
    """
    if seed is None:
        seed = int.from_bytes(hashlib.sha256(req_id.encode()).digest()[:8], "little")
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class BlockDiffRunnerMixin:
    """Mixed into vLLM's (CPU or GPU) V1 model runner; see the module docstring."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._defaults = model_defaults(self.vllm_config)
        self._steps = FAMILY_STEPS[self._defaults.family](self._defaults, self.vllm_config)
        self._states: dict[str, object] = {}
        self._plan: StepPlan | None = None

    def _state(self, req_id: str):
        state = self._states.get(req_id)
        if state is None:
            request = self.requests[req_id]
            params = request.sampling_params
            state = self._steps.new_state(params, request_generator(req_id, params.seed, self.device),
                                          request.num_prompt_tokens)
            self._states[req_id] = state
        return state

    def _update_states(self, scheduler_output):
        for req_id in scheduler_output.finished_req_ids:
            self._states.pop(req_id, None)
        result = super()._update_states(scheduler_output)
        batch = self.input_batch
        for req_id, placeholders in scheduler_output.scheduled_spec_decode_tokens.items():
            req_index = batch.req_id_to_index[req_id]
            start = int(batch.num_tokens_no_spec[req_index])
            self._steps.place(batch.token_ids_cpu[req_index], start, placeholders, self._state(req_id))
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
            self._steps.plan(
                plan,
                req_index,
                req_id,
                self._state(req_id),
                int(batch.num_computed_tokens_cpu[req_index]),
                num_sched,
                len(spec.get(req_id, ())),
                offset,
                batch.token_ids_cpu[req_index],
            )
            offset += num_sched
        self._plan = plan
        if plan.token_overrides:
            self._override_tokens(plan)
        indices = plan.logits_indices()
        if not len(indices):
            # A step without canvases or windows needs no logits, but tensor-parallel ranks gather
            # them anyway, and the CPU communicator's shared-memory all-gather dies (SIGFPE) on an
            # empty tensor: compute one row nobody reads.
            indices = np.zeros(1, dtype=np.int64)
        logits_indices = torch.from_numpy(indices).to(self.device)
        max_rows = max((c.length for c in plan.canvases), default=1)
        return logits_indices, None, max_rows

    def _override_tokens(self, plan: StepPlan) -> None:
        """Positions, input ids and KV slots of the tokens the plan places itself (SDLM verify rows)."""
        index, positions, token_ids, slots = (np.concatenate(parts) for parts in zip(*plan.token_overrides))
        index = torch.from_numpy(index).to(self.device)
        self.positions[index] = torch.from_numpy(positions).to(self.positions.device, self.positions.dtype)
        self.input_ids.gpu[index] = torch.from_numpy(token_ids).to(self.device, self.input_ids.gpu.dtype)
        for block_table in self.input_batch.block_table.block_tables:
            mapping = block_table.slot_mapping.gpu
            mapping[index] = torch.from_numpy(slots).to(mapping.device, mapping.dtype)

    def initialize_kv_cache(self, kv_cache_config, *args, **kwargs):
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
        self._steps.kv_cache_ready(kv_cache_config)

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

    # ---- sampling: the family's decoding step ------------------------------------------------
    def _sample(self, logits, spec_decode_metadata):
        plan = getattr(self, "_sampling_plan", None)
        self._sampling_plan = None
        if plan is None:
            return super()._sample(logits, spec_decode_metadata)
        # Width >= 2 so vLLM strips the -1 padding of requests that commit nothing this step.
        width = max([2] + [c.length for c in plan.canvases])
        out = torch.full((self.input_batch.num_reqs, width), -1, dtype=torch.int32)
        grammar, self._grammar_output = getattr(self, "_grammar_output", None), None
        if plan.canvases:
            report = self._steps.sample(logits, plan, self._states, out, self.input_batch, grammar)
            for req_id, frame in report.frames.items():
                frame["position"] = frame.pop("start") - self.requests[req_id].num_prompt_tokens
            self._report = report
        return SamplerOutput(sampled_token_ids=out.to(self.device), logprobs_tensors=plan.logprobs)

    def sample_tokens(self, grammar_output=None, *args, **kwargs):
        # vLLM would apply the grammar's bitmask rows to its own logits layout (a row per request and
        # draft); ours are segments, so the family's step applies them (SDLM: row 0 of each window).
        self._grammar_output = grammar_output
        output = super().sample_tokens(None, *args, **kwargs)
        report, self._report = getattr(self, "_report", None), None
        if report is not None and isinstance(output, ModelRunnerOutput):
            # Extras the scheduler reads (the Ray executor pickles the whole output, so they arrive):
            # per-step states of traced requests, BD3LM commit counts (tokens per forward) and the
            # grammar-checked frontiers of constrained BD3LM canvases.
            if report.frames:
                output.blockdiff_trace = report.frames
            if report.commits:
                output.blockdiff_commits = report.commits
            if report.frontiers:
                output.blockdiff_frontiers = report.frontiers
        return output
