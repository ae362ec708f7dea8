"""BD3LM in the model runner: the canvas in the input, block-causal segments, batched denoising.

Per step, for every request the scheduler gave canvas slots (``scheduled_spec_decode_tokens``,
placeholders of the chunk's mask slots):
1. the request's current canvas (masks and tokens committed so far in this chunk) replaces the
   placeholders in the input ids;
2. its query is cut into block-causal segments plus the canvas segment (``segments.py``);
3. logits are computed only at still-masked canvas positions; the denoising policy commits;
4. the canvas is returned to the scheduler only when the chunk is finished (it ran all its
   steps, or the request's eos appeared), as that step's sampled tokens; otherwise nothing.

Classifier-free guidance (``cfg_scale > 0``, the card's option): every step also needs the
canvas's logits over an *unconditional* prefix in which every token is the mask id. Under the
block-causal mask an all-mask block's keys/values depend only on its position, so the whole
all-mask prefix is one sequence shared by every request: scratch pages (``engine/scratch.py``)
filled once, in whole blocks, by whichever request first needs a longer one (a *fill* step:
its placeholders are all-mask tokens written there). A request's unconditional row then reads
that shared prefix up to the page holding its block start ``p0`` and, in a scratch region of
its own, the all-mask tokens ``[p0, T)`` (the prompt-tail block as the card's prefix pass sees
it) and a copy of the canvas. Placeholders of a guided step: the canvas, then ``T - p0`` masks
and the canvas again, whose positions, ids and KV slots the plan rewrites. The two rows'
logits combine as ``un + (cfg_scale + 1) * (cond - un)`` before the denoising rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vllm_blockdiff.algorithms import bd3lm
from vllm_blockdiff.algorithms.constraints import VocabConstraints, mask_by_bitmask
from vllm_blockdiff.engine.scratch import ScratchUser, slots_of
from vllm_blockdiff.engine.segments import CanvasRow, StepPlan, StepReport, add_block_causal_segments
from vllm_blockdiff.options import BD3LMOptions, ModelDefaults, resolve_bd3lm_options


@dataclass
class ChunkState:
    """One request's chunk being denoised."""

    start: int  # absolute position of the chunk's first slot
    canvas: np.ndarray  # [chunk_len] int64, mask ids where not yet committed
    commits: list[int]  # tokens to commit at each remaining step (the card's uniform split)


@dataclass
class BD3LMRequestState:
    options: BD3LMOptions
    generator: torch.Generator
    eos_token_id: int | None  # the card's end-of-block stop (None with ignore_eos)
    constraints: VocabConstraints | None  # logit_bias, allowed_token_ids, bad_words, min_tokens
    num_prompt_tokens: int
    chunk: ChunkState | None = None


class BD3LMSteps(ScratchUser):
    """The BD3LM family's part of :class:`~vllm_blockdiff.engine.runner.BlockDiffRunnerMixin`."""

    def __init__(self, defaults: ModelDefaults, vllm_config):
        super().__init__(vllm_config)
        self.defaults = defaults
        self.mask_id = defaults.mask_token_id
        self.page = self.scratch.page_size
        self.uncond_filled = 0  # the shared all-mask prefix is computed up to here

    def new_state(self, params, generator: torch.Generator, num_prompt_tokens: int) -> BD3LMRequestState:
        eos = None if params.ignore_eos else params.eos_token_id
        return BD3LMRequestState(resolve_bd3lm_options(params, self.defaults), generator, eos,
                                 VocabConstraints.from_params(params), num_prompt_tokens)

    def _canvas_len(self, start: int, num_placeholders: int, state: BD3LMRequestState) -> int:
        """How many placeholders are the canvas: all, or a guided step's first third (0 for a fill)."""
        if not state.options.cfg_scale:
            return num_placeholders
        page_start = start // self.page * self.page
        if self.uncond_filled < page_start:
            return 0
        return (num_placeholders - (start - page_start)) // 2

    def place(self, token_ids: np.ndarray, start: int, placeholders: list[int], state: BD3LMRequestState):
        """Write the canvas over its placeholders (a new chunk starts as masks)."""
        n = self._canvas_len(start, len(placeholders), state)
        if not n:
            return
        if state.chunk is None or state.chunk.start != start:
            schedule = bd3lm.transfer_schedule(n, state.options.steps_per_block)
            state.chunk = ChunkState(start, np.full(n, self.mask_id, dtype=np.int64), schedule)
        if state.options.left_frontier:
            # Under a grammar the scheduler owns the canvas: the grammar-valid frontier, then masks.
            state.chunk.canvas = np.asarray(placeholders[:n], dtype=np.int64)
        token_ids[start : start + n] = state.chunk.canvas

    def plan(self, plan: StepPlan, req_index: int, req_id: str, state: BD3LMRequestState,
             computed: int, num_sched: int, num_masks: int, offset: int, token_ids: np.ndarray) -> None:
        block_size = state.options.block_size
        T = computed + num_sched - num_masks  # committed tokens; the placeholders follow
        add_block_causal_segments(plan, req_index, computed, T, block_size)
        if not num_masks:
            return
        first = offset + T - computed
        n = self._canvas_len(T, num_masks, state)
        if not n:
            self._plan_fill(plan, req_index, first, num_masks, block_size)
            return
        plan.add(req_index, n, T + n, causal=False)
        masked = np.flatnonzero(state.chunk.canvas == self.mask_id)
        plan.canvases.append(CanvasRow(req_index, req_id, first, n, masked))
        if state.options.cfg_scale:
            self._plan_unconditional(plan, req_index, req_id, T, first + n, state, masked)

    def _plan_fill(self, plan: StepPlan, req_index: int, first: int, length: int, block_size: int) -> None:
        """All-mask tokens extending the shared prefix, block-causal, into the shared pages."""
        shared = self.scratch.shared(self.scratch_first_page)
        positions = np.arange(self.uncond_filled, self.uncond_filled + length)
        plan.override_tokens(np.arange(first, first + length), positions, np.full(length, self.mask_id),
                             slots_of(positions, shared, 0, self.page))
        add_block_causal_segments(plan, req_index, int(positions[0]), int(positions[-1]) + 1, block_size,
                                  pages=(0, shared))
        self.uncond_filled += length

    def _plan_unconditional(self, plan: StepPlan, req_index: int, req_id: str, T: int, first: int,
                            state: BD3LMRequestState, masked: np.ndarray) -> None:
        """The canvas again, over the shared all-mask prefix and this request's all-mask tail."""
        n = len(state.chunk.canvas)
        page_start = T // self.page * self.page
        region = self.scratch.region(self.scratch_first_page, self.claim_request_slot(plan), 0)
        used = -(-(T + n - page_start) // self.page)
        pages = np.concatenate([self.scratch.shared(self.scratch_first_page)[: page_start // self.page],
                                region[:used]])
        positions = np.arange(page_start, T + n)
        token_ids = np.concatenate([np.full(T - page_start, self.mask_id), state.chunk.canvas])
        plan.override_tokens(np.arange(first, first + len(positions)), positions, token_ids,
                             slots_of(positions, region, page_start, self.page))
        add_block_causal_segments(plan, req_index, page_start, T, state.options.block_size, pages=(0, pages))
        plan.add(req_index, n, T + n, causal=False, pages=(0, pages))
        plan.canvases.append(CanvasRow(req_index, req_id, first + T - page_start, n, masked, unconditional=True))

    def sample(self, logits: torch.Tensor, plan: StepPlan, states: dict, out: torch.Tensor,
               batch, grammar=None) -> StepReport:
        """One batched denoising step; finished chunks are written to ``out`` rows. Returns, per
        request, how many positions committed, and the trace frames (the canvas after the step).
        ``grammar`` (vLLM's ``GrammarOutput``, one bitmask row per constrained request): that row masks
        the request's leftmost masked position, and the request commits a left frontier (docs/design.md
        §15); its chunk never ends here, the scheduler ends it once the grammar accepted the whole canvas
        (``report.frontiers`` carries each step's committed left part)."""
        logits, canvases = self._guided(logits, plan.canvases, states)
        if grammar is not None:
            logits = self._under_grammar(logits, canvases, grammar)
        steps = []
        for row in canvases:
            state = states[row.req_id]
            opts, chunk = state.options, state.chunk
            # The card runs a fixed number of steps: a position may "commit" the mask id itself
            # and stay masked, so completion is counted in steps (or in masks, once none is left).
            output = None
            if state.constraints is not None and state.constraints.sequences:
                output = batch.token_ids_cpu[row.req_index, state.num_prompt_tokens : chunk.start].tolist()
            # A left frontier may need more steps than the schedule has: it goes on with the last count.
            num_commits = chunk.commits.pop(0) if len(chunk.commits) > 1 or not opts.left_frontier else chunk.commits[0]
            steps.append(bd3lm.ChunkStep(
                chunk.canvas, row.logit_positions, num_commits, opts.temperature,
                opts.remasking, state.generator, opts.threshold, opts.factor, state.constraints,
                chunk.start - state.num_prompt_tokens, output, opts.left_frontier,
            ))
        report = StepReport()
        if not steps:
            return report
        result = bd3lm.denoise_batch(logits, steps, self.mask_id)
        new = result.canvases  # [requests, width], padded with mask ids past each canvas's length
        inside = np.arange(new.shape[1])[None, :] < np.array([row.length for row in canvases])[:, None]
        eos = np.array([-1 if states[row.req_id].eos_token_id is None else states[row.req_id].eos_token_id
                        for row in canvases])
        # A chunk ends when its steps are used up, when no mask is left, or at eos (the card's stop).
        ends = ~((new == self.mask_id) & inside).any(axis=1) | ((new == eos[:, None]) & inside).any(axis=1)
        finished = []
        for i, (row, committed) in enumerate(zip(canvases, result.committed)):
            state = states[row.req_id]
            chunk = state.chunk
            chunk.canvas = new[i, : row.length].copy()
            report.commits[row.req_id] = committed
            if state.options.trace:
                report.frames[row.req_id] = {"kind": "bd3lm", "start": chunk.start, "tokens": chunk.canvas.tolist(),
                                             "mask": self.mask_id, "committed": committed}
            if state.options.left_frontier:
                report.frontiers[row.req_id] = bd3lm.committed_prefix(chunk.canvas, self.mask_id)
            elif ends[i] or not chunk.commits:
                finished.append((row, chunk.canvas))
                state.chunk = None
        if finished:
            rows = np.concatenate([np.full(len(c), row.req_index) for row, c in finished])
            cols = np.concatenate([np.arange(len(c)) for _, c in finished])
            out[torch.from_numpy(rows), torch.from_numpy(cols)] = torch.from_numpy(
                np.concatenate([c for _, c in finished]).astype(np.int32))
        return report

    @staticmethod
    def _under_grammar(logits: torch.Tensor, rows: list[CanvasRow], grammar) -> torch.Tensor:
        """The leftmost masked position of each constrained canvas: tokens its grammar's bitmask rules out
        get ``-inf`` (its logits row is the canvas's first: rows follow the masked positions in order)."""
        index = {req_id: i for i, req_id in enumerate(grammar.structured_output_request_ids)}
        starts = np.cumsum([0] + [len(row.logit_positions) for row in rows])[:-1]
        picked = [(int(starts[k]), index[row.req_id]) for k, row in enumerate(rows)
                  if row.req_id in index and len(row.logit_positions)]
        if not picked:
            return logits
        logits = logits.float().clone()
        mask_by_bitmask(logits, [r for r, _ in picked], grammar.grammar_bitmask[[b for _, b in picked]])
        return logits

    @staticmethod
    def _guided(logits: torch.Tensor, rows: list[CanvasRow], states: dict):
        """Logits of the conditional canvases, each guided one combined with its unconditional row
        as ``un + (cfg_scale + 1) * (cond - un)`` (the card's formula)."""
        if not any(row.unconditional for row in rows):
            return logits, rows
        starts = np.cumsum([0] + [len(row.logit_positions) for row in rows])
        conditional, parts = [], []
        for i, row in enumerate(rows):
            cond = logits[starts[i] : starts[i + 1]]
            if row.unconditional:
                un = logits[starts[i] : starts[i + 1]]
                scale = states[row.req_id].options.cfg_scale
                parts[-1] = un + (scale + 1.0) * (parts[-1] - un)
                continue
            conditional.append(row)
            parts.append(cond)
        return torch.cat(parts), conditional
