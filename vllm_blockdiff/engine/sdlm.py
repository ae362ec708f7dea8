"""SDLM in the model runner: a causal segment and a window per request, a confident prefix out.

With committed tokens ``x_0 .. x_{L-1}``, the scheduler (``SDLMScheduler``) gives a request the
tokens accepted last step plus ``x_{L-1}`` and D-1 mask placeholders, at their natural positions.
Attention rows (``segments.py``):

    accepted last step   x_{L-1-n} .. x_{L-2}      causal, seq_len = L-1  (KV kept)
    window               [x_{L-1}, MASK x (D-1)]   non-causal, seq_len = L-1+D

The window attends to the cached context and to itself; its first slot is ``x_{L-1}``'s own, so
it never sees the causal copy of ``x_{L-1}`` (that KV is written next step). Window row j's
logits predict ``x_{L+j}``; the algorithm (``algorithms/sdlm.py``) returns the accepted prefix,
which becomes the step's sampled tokens (1..D, never past the context).
A step without masks is a prompt chunk: causal, no output.

``self_speculative`` (SDLM's packed verification). A *draft step* is a plain window whose D
predictions ``y`` become the draft; it commits nothing. A *packed step* then verifies the whole
draft in one forward: verify row i is the window ``[y_i, MASK x (D-1)]`` at positions L+i..,
seeing ``x_0..x_{L-1}, y_0..y_{i-1}`` causally. ``y_0`` is always accepted, ``y_{i+1}`` while it
equals row i's first prediction; the accepted row's predictions are the next draft. The rows
differ in their causal tail, and vLLM's attention rows see ``[0, seq_len)`` of a block table,
so each row gets *private KV pages*: its block-table row keeps the request's pages below
``b = P * floor(L / P)`` and points the next ones at scratch pages (the top of the KV cache,
hidden from the scheduler), into which the row's tail ``x_b .. x_{L-1}, y_0 .. y_{i-1}`` is
recomputed causally (*dup* tokens) before its window. The drafts' causal KV goes to the
request's own slots in the same forward, so accepted drafts need no recompute. Layout of one
packed request's scheduled tokens (positions, KV slots):

    x_c .. x_{L-1}, y_0 .. y_{D-2}                   natural positions and slots, causal
    for i in 0..D-1:  x_b .. x_{L-1}, y_0 .. y_{i-1}  positions b.., scratch region i, causal
                      y_i, MASK x (D-1)              positions L+i.., scratch region i, window
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
import torch
from vllm.v1.outputs import LogprobsTensors

from vllm_blockdiff.algorithms import sdlm
from vllm_blockdiff.algorithms.constraints import VocabConstraints, allowed_prefix, mask_by_bitmask
from vllm_blockdiff.engine.scratch import ScratchPages, ScratchUser, slots_of
from vllm_blockdiff.engine.segments import CanvasRow, StepPlan, StepReport
from vllm_blockdiff.options import ModelDefaults, SDLMOptions, resolve_sdlm_options


class StepKind(enum.Enum):
    """What a window-ready SDLM request does in a step (decided by the scheduler)."""

    WINDOW = "window"  # prob_conf / entropy_conf: commit the confident prefix
    DRAFT = "draft"  # self_speculative without a draft: the window's predictions become the draft
    PACKED = "packed"  # self_speculative: verify the draft with D windows in scratch pages
    FALLBACK = "fallback"  # self_speculative, no scratch this step: commit the first prediction


def packed_num_scheduled(L: int, c: int, D: int, P: int) -> int:
    """Tokens a packed verify step schedules for a request with L committed, c cached tokens."""
    tail = L - (L // P) * P
    return (L - c) + (D - 1) + sum(tail + i + D for i in range(D))


def packed_layout_fits(L: int, c: int, defaults: ModelDefaults, scratch: ScratchPages) -> bool:
    """Whether a packed step's placeholders and its rows' page overrides stay inside the context."""
    D, P = defaults.block_size, scratch.page_size
    base = (L // P) * P
    return c + packed_num_scheduled(L, c, D, P) <= defaults.max_model_len and (
        base + scratch.pages_per_region * P <= defaults.max_model_len
    )


def committed_logprobs(logits: torch.Tensor, wanted: list, shape: tuple[int, int]) -> LogprobsTensors:
    """vLLM's sampled-token logprobs for the ``[num_reqs, W]`` output layout: for each committed
    token, the log-softmax of the window row it came from (raw logits, vLLM's default mode) at the
    token and its top-k. ``wanted``: (request row, first logits row, tokens, k) per request."""
    num_reqs, width = shape
    k_max = max(k for *_, k in wanted)
    token_ids = torch.zeros((num_reqs * width, k_max + 1), dtype=torch.int32)
    logprobs = torch.zeros((num_reqs * width, k_max + 1), dtype=torch.float32)
    ranks = torch.zeros(num_reqs * width, dtype=torch.int32)
    for req_index, start, tokens, _ in wanted:
        rows = torch.log_softmax(logits[start : start + len(tokens)].float(), dim=-1)
        chosen = torch.tensor(tokens, device=rows.device)
        chosen_lp = rows.gather(-1, chosen[:, None])
        out = slice(req_index * width, req_index * width + len(tokens))
        token_ids[out, 0] = chosen.to(torch.int32).cpu()
        logprobs[out, 0] = chosen_lp.squeeze(-1).cpu()
        ranks[out] = ((rows > chosen_lp).sum(-1) + 1).to(torch.int32).cpu()
        if k_max:
            top = rows.topk(k_max, dim=-1)
            token_ids[out, 1:] = top.indices.to(torch.int32).cpu()
            logprobs[out, 1:] = top.values.cpu()
    return LogprobsTensors(token_ids, logprobs, ranks)


@dataclass
class SDLMRequestState:
    options: SDLMOptions
    generator: torch.Generator
    constraints: VocabConstraints | None  # logit_bias, allowed_token_ids, bad_words, min_tokens
    num_prompt_tokens: int
    draft: list[int] | None = None  # self_speculative: predictions awaiting verification


class SDLMSteps(ScratchUser):
    """The SDLM family's part of :class:`~vllm_blockdiff.engine.runner.BlockDiffRunnerMixin`."""

    def __init__(self, defaults: ModelDefaults, vllm_config):
        super().__init__(vllm_config)
        self.defaults = defaults
        self.D = defaults.block_size

    def new_state(self, params, generator: torch.Generator, num_prompt_tokens: int) -> SDLMRequestState:
        return SDLMRequestState(resolve_sdlm_options(params, self.defaults), generator,
                                VocabConstraints.from_params(params), num_prompt_tokens)

    def place(self, token_ids: np.ndarray, start: int, placeholders: list[int], state: SDLMRequestState):
        """A packed step's first D-1 slots after the committed tokens hold the drafts (causal)."""
        if len(placeholders) > self.D - 1:
            token_ids[start : start + self.D - 1] = state.draft[: self.D - 1]

    def plan(self, plan: StepPlan, req_index: int, req_id: str, state: SDLMRequestState,
             computed: int, num_sched: int, num_masks: int, offset: int, token_ids: np.ndarray) -> None:
        if not num_masks:
            plan.add(req_index, num_sched, computed + num_sched, causal=True)
            return
        if num_masks > self.D - 1:
            self._plan_packed(plan, req_index, req_id, state, computed, num_sched - num_masks + computed,
                              offset, token_ids)
            return
        num_causal = num_sched - num_masks - 1  # x_{L-1} opens the window
        if num_causal:
            plan.add(req_index, num_causal, computed + num_causal, causal=True)
        window = num_masks + 1
        plan.add(req_index, window, computed + num_sched, causal=self.defaults.window_causal)
        plan.canvases.append(CanvasRow(req_index, req_id, offset + num_causal, window, np.arange(window)))

    def _plan_packed(self, plan: StepPlan, req_index: int, req_id: str, state: SDLMRequestState,
                     computed: int, L: int, offset: int, token_ids: np.ndarray) -> None:
        D, P, scratch = self.D, self.scratch.page_size, self.scratch
        draft = state.draft
        num_causal = L - computed + D - 1  # uncached committed tokens + drafts y_0..y_{D-2}
        plan.add(req_index, num_causal, L + D - 1, causal=True)
        first_page = L // P  # verify rows keep the request's pages below it
        base = first_page * P
        tail = [int(t) for t in token_ids[base:L]]
        k = offset + num_causal
        slot = self.claim_request_slot(plan)
        for i in range(D):
            pages = scratch.region(self.scratch_first_page, slot, i)
            dup = tail + draft[:i]
            window = [draft[i]] + [self.defaults.mask_token_id] * (D - 1)
            positions = np.arange(base, L + i + D)
            slots = slots_of(positions, pages, base, P)
            plan.override_tokens(np.arange(k, k + len(positions)), positions, np.array(dup + window), slots)
            if dup:
                plan.add(req_index, len(dup), L + i, causal=True, pages=(first_page, pages))
            plan.add(req_index, D, L + i + D, causal=self.defaults.window_causal, pages=(first_page, pages))
            plan.canvases.append(CanvasRow(req_index, req_id, k + len(dup), D, np.arange(D), verify_row=i))
            k += len(positions)

    def sample(self, logits: torch.Tensor, plan: StepPlan, states: dict, out: torch.Tensor,
               batch, grammar=None) -> StepReport:
        """Committed tokens of every window-ready request, written to ``out`` rows. Reports the trace
        frames (each traced request's window predictions and how many committed). ``grammar`` (vLLM's
        ``GrammarOutput``: one bitmask row per constrained request) constrains window row 0; the
        scheduler cuts the rest of the run at the first token the grammar rejects."""
        num_tokens, token_ids = batch.num_tokens_no_spec, batch.token_ids_cpu
        grouped: dict[str, list[tuple[int, CanvasRow]]] = {}
        start = 0
        for row in plan.canvases:
            grouped.setdefault(row.req_id, []).append((start, row))
            start += row.length
        raw_logits = logits  # logprobs are of the raw logits (vLLM's default logprobs mode)
        outputs = {req_id: token_ids[rows[0][1].req_index, states[req_id].num_prompt_tokens:
                                     int(num_tokens[rows[0][1].req_index])].tolist()
                   for req_id, rows in grouped.items() if states[req_id].constraints is not None}
        if outputs:
            logits = self._constrained(logits, grouped, states, outputs)
        if grammar is not None:
            logits = self._under_grammar(logits, grouped, grammar, raw_logits)
        committed: dict[str, list[int]] = {}
        windows = []  # (req_id, logits start, row) of the confidence-decoded requests
        for req_id, rows in grouped.items():
            if states[req_id].options.alg == "self_speculative":
                committed[req_id] = self._self_speculative(logits, rows, states[req_id])
            else:
                windows.append((req_id, *rows[0]))
        if windows:
            window_logits = logits
            if len(windows) < len(grouped):  # self-speculative rows sit in between
                index = torch.cat([torch.arange(s, s + row.length) for _, s, row in windows])
                window_logits = logits.index_select(0, index.to(logits.device))
            requests = [self._window_request(row.length, states[req_id]) for req_id, _, row in windows]
            for (req_id, _, _), tokens in zip(windows, sdlm.commit_windows(window_logits, requests)):
                committed[req_id] = tokens
        report, wanted = StepReport(), []
        rows_out = np.full(tuple(out.shape), -1, dtype=np.int32)
        window_start = {req_id: start for req_id, start, _ in windows}
        for req_id, rows in grouped.items():
            req_index = rows[0][1].req_index
            # Never past the context: vLLM's runner refuses tokens beyond max_model_len.
            tokens = committed[req_id][: self.defaults.max_model_len - int(num_tokens[req_index])]
            constraints = states[req_id].constraints
            if constraints is not None and constraints.sequences:
                tokens = tokens[: allowed_prefix(constraints, outputs[req_id], tokens)]
            if tokens:
                rows_out[req_index, : len(tokens)] = tokens
                if states[req_id].options.logprobs is not None:
                    wanted.append((req_index, window_start[req_id], tokens, states[req_id].options.logprobs))
            state = states[req_id]
            if state.options.trace:
                start, row = rows[0]
                window = state.draft
                if window is None:
                    window = logits[start : start + row.length].argmax(-1).tolist()
                report.frames[req_id] = {"kind": "sdlm", "start": int(num_tokens[req_index]), "tokens": list(window),
                                         "accepted": len(tokens)}
        out.copy_(torch.from_numpy(rows_out))
        if wanted:
            plan.logprobs = committed_logprobs(raw_logits, wanted, out.shape)
        return report

    @staticmethod
    def _under_grammar(logits: torch.Tensor, grouped: dict, grammar, raw_logits: torch.Tensor) -> torch.Tensor:
        """Window row 0 of each constrained request: tokens its grammar's bitmask rules out get ``-inf``."""
        if logits is raw_logits:
            logits = logits.float().clone()
        rows = [grouped[req_id][0][0] for req_id in grammar.structured_output_request_ids if req_id in grouped]
        keep = [i for i, req_id in enumerate(grammar.structured_output_request_ids) if req_id in grouped]
        mask_by_bitmask(logits, rows, grammar.grammar_bitmask[keep])
        return logits

    def _constrained(self, logits: torch.Tensor, grouped: dict, states: dict, outputs: dict) -> torch.Tensor:
        """The logits with each constrained request's rows masked and biased (``algorithms/constraints``).
        A window row j predicts output position ``len(output) + j``; a verify row i of a packed step
        follows the drafts ``y_0 .. y_i``."""
        logits = logits.float().clone()
        for req_id, output in outputs.items():
            state = states[req_id]
            for start, row in grouped[req_id]:
                context = output + (state.draft[: row.verify_row + 1] if row.verify_row >= 0 else [])
                rows = slice(start, start + row.length)
                indices = [len(context) + j for j in range(row.length)]
                logits[rows] = state.constraints.apply(logits[rows], context, indices)
        return logits

    def _window_request(self, num_rows: int, state: SDLMRequestState) -> sdlm.WindowRequest:
        opts = state.options
        return sdlm.WindowRequest(num_rows, threshold=opts.threshold, temperature=opts.temperature,
                                  top_p=opts.top_p, top_k=opts.top_k, entropy_conf=opts.entropy_conf,
                                  generator=state.generator)

    def _self_speculative(self, logits: torch.Tensor, rows, state: SDLMRequestState) -> list[int]:
        """Draft, verify, or fall back; returns the committed tokens and updates the draft."""
        predictions = [
            sdlm.window_predictions(logits[start : start + row.length], self._window_request(row.length, state))
            for start, row in rows
        ]
        if rows[0][1].verify_row >= 0:  # packed: one window per draft token
            n = sdlm.verified_length(state.draft, [p[0] for p in predictions])
            committed, state.draft = state.draft[:n], predictions[n - 1]
            return committed
        if state.draft is None:  # draft step: nothing commits yet
            state.draft = predictions[0]
            return []
        state.draft = None  # fallback: first-token decoding, a new draft next time
        return predictions[0][:1]
