"""Scheduler side of block diffusion: claim mask slots, keep ``num_computed_tokens`` honest.

vLLM schedules ``num_tokens_with_spec - num_computed_tokens`` tokens per request. We use the
speculative-token list for the mask slots: each running request carries placeholder ids after
its committed tokens, so ``allocate_slots`` gives them KV slots in the paged cache and every step
re-schedules exactly those slots. Prefix-cache hashing never covers a slot whose KV is not the
final, clean KV of a committed token.

- ``BD3LMScheduler``: the slots are the chunk being denoised (the *canvas*); see its docstring.
- ``SDLMScheduler``: the slots are the D-1 masks of the window after the last token.
"""

from __future__ import annotations

import dataclasses

from vllm.v1.core.sched.output import GrammarOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
from vllm.v1.metrics.stats import RequestSpecDecodeMetrics
from vllm.v1.spec_decode.metrics import SpecDecodingStats

from vllm_blockdiff.algorithms import bd3lm
from vllm_blockdiff.config import model_defaults
from vllm_blockdiff.engine.scratch import ScratchPages
from vllm_blockdiff.engine.sdlm import StepKind, packed_layout_fits, packed_num_scheduled
from vllm_blockdiff.options import BD3LMOptions, resolve_bd3lm_options, resolve_sdlm_options
from vllm_blockdiff.serving_trace import TRACE_KEY


def reattach_spec_decode_metrics(scheduler, outputs) -> None:
    """vLLM sends a request's acceptance statistics only with the engine's finish; a stop string ends
    a request in the front end instead, so every output carries them."""
    for engine_outputs in outputs.values():
        for output in engine_outputs.outputs:
            request = scheduler.requests.get(output.request_id)
            if output.spec_decode_metrics is None and request is not None:
                output.spec_decode_metrics = request.spec_decode_metrics


def observe_block_forward(stats: SpecDecodingStats, block_size: int, num_committed: int) -> None:
    """One BD3LM denoising forward in vLLM's spec-decode statistics: a draft of ``block_size - 1``
    tokens with ``num_committed - 1`` accepted (per-position counts up to the stats' width)."""
    width = stats.num_spec_tokens
    stats.num_drafts += 1
    stats.num_draft_tokens += block_size - 1
    stats.num_accepted_tokens += num_committed - 1
    for i in range(min(num_committed - 1, width)):
        stats.num_accepted_tokens_per_pos[i] += 1
    for i in range(min(block_size - 1, width)):
        stats.num_draft_tokens_per_pos[i] += 1


class BlockDiffScheduler(Scheduler):
    """What both families share: mask slots are scheduled whole or not at all, and the top pages
    of the KV cache are the runner's scratch (``engine/scratch.py``), never handed out."""

    def __init__(self, vllm_config, kv_cache_config, *args, **kwargs):
        self._scratch = ScratchPages.for_config(vllm_config)
        kv_cache_config = dataclasses.replace(
            kv_cache_config, num_blocks=kv_cache_config.num_blocks - self._scratch.num_pages
        )
        super().__init__(vllm_config, kv_cache_config, *args, **kwargs)
        self._defaults = model_defaults(self.vllm_config)

    def schedule(self, *args, **kwargs):
        # Mask slots must be computed together with the tokens before them. Hold back the running
        # requests whose step does not fit in this step's token budget instead of letting vLLM
        # schedule part of it.
        budget = self.max_num_scheduled_tokens
        held_back = []
        kept = []
        for request in self.running:
            need = request.num_tokens_with_spec - request.num_computed_tokens
            if (request.spec_token_ids and need > budget) or self._must_wait(request):
                held_back.append(request)
            else:
                kept.append(request)
                budget -= max(need, 0)
        if held_back:
            self.running = kept
        try:
            return super().schedule(*args, **kwargs)
        finally:
            if held_back:
                self.running = self.running + held_back

    def _must_wait(self, request) -> bool:
        """A running request that must sit this step out (it cannot make progress yet)."""
        return False

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        frames = getattr(model_runner_output, "blockdiff_trace", None)
        if frames:
            self._attach_trace(outputs, frames)
        return outputs

    def _attach_trace(self, outputs, frames: dict) -> None:
        """Per-step frames of traced requests ride to the front end in the output's
        ``kv_transfer_params`` (``{"blockdiff_trace": [frame]}``), on an output without new tokens
        when the step committed none (docs/design.md §10)."""
        by_id = {o.request_id: o for engine_outputs in outputs.values() for o in engine_outputs.outputs}
        for req_id, frame in frames.items():
            output = by_id.get(req_id)
            if output is None:
                request = self.requests.get(req_id)
                if request is None or request.is_finished():
                    continue
                output = EngineCoreOutput(request_id=req_id, new_token_ids=[])
                if request.client_index in outputs:
                    outputs[request.client_index].outputs.append(output)
                else:
                    outputs[request.client_index] = EngineCoreOutputs(outputs=[output])
            if output.kv_transfer_params is None:
                output.kv_transfer_params = {}
            output.kv_transfer_params.setdefault(TRACE_KEY, []).append(frame)


class BD3LMScheduler(BlockDiffScheduler):
    """Canvas slots for the chunk being denoised; ``num_computed_tokens`` rolled back per step.

    After each step (``update_from_output``):
    - prompt chunk that ended inside a diffusion block (but not at the prompt end): roll back to
      the block start, since a block must be encoded in one piece to be bidirectional;
    - chunk finished (the runner returned its tokens): roll back to the block start so the next
      step re-encodes the whole block with clean tokens (the card's next prefix pass) together
      with the first denoising step of the next chunk;
    - otherwise: drop the canvas from ``num_computed_tokens`` (it is rewritten every step).
    Prefix-cache hashing stops at ``request.num_tokens`` (committed tokens), so mask slots are
    never cached.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Nothing is sampled "after" the last scheduled token: do not reserve a context slot.
        self.num_sampled_tokens_per_step = 0
        self._step_commits: dict[str, int] = {}
        self._step_block_sizes: dict[str, int] = {}
        # Classifier-free guidance: the shared all-mask prefix (engine/bd3lm.py) is computed up to
        # here; requests whose unconditional row needs more fill it, a bounded chunk per step.
        self._uncond_filled = 0
        block = self._defaults.block_size
        self._fill_limit = max(block, self.max_num_scheduled_tokens // 2 // block * block)

    def schedule(self, *args, **kwargs):
        filler = self._place_guidance_rows()
        output = super().schedule(*args, **kwargs)
        if filler is not None and filler[0].request_id in output.num_scheduled_tokens:
            self._uncond_filled += filler[1]
        return output

    def _place_guidance_rows(self):
        """Placeholders of the requests with ``cfg_scale > 0`` (see ``engine/bd3lm.py``): the canvas,
        the all-mask tokens from the page of the canvas's block and the canvas again (the
        unconditional row); or, while the shared all-mask prefix is shorter than that page start,
        a fill chunk for one request and a pause for the others (and for guided requests beyond
        the scratch regions of one forward). Returns (filler, fill length)."""
        filler = None
        num_guided = 0  # each guided step uses one scratch region
        mask = self._defaults.mask_token_id
        page, block = self._scratch.page_size, self._defaults.block_size
        for request in self.running:
            request._blockdiff_waits = False
            canvas = getattr(request, "_blockdiff_canvas_len", 0)
            if not canvas or not request.spec_token_ids or not self._options(request).cfg_scale:
                continue
            T = request.num_tokens
            page_start = T // page * page
            if self._uncond_filled >= page_start and num_guided < self._scratch.num_requests:
                num_guided += 1
                request.spec_token_ids = [mask] * (2 * canvas + T - page_start)
            elif self._uncond_filled >= page_start:
                request._blockdiff_waits = True
            elif filler is None:
                room = (self.max_model_len - T) // block * block
                fill = min(page_start - self._uncond_filled, self._fill_limit, room)
                filler = (request, fill)
                request.spec_token_ids = [mask] * fill
            else:
                request._blockdiff_waits = True
        return filler

    def _must_wait(self, request) -> bool:
        return getattr(request, "_blockdiff_waits", False)

    def _options(self, request) -> BD3LMOptions:
        opts = getattr(request, "_blockdiff_options", None)
        if opts is None:
            opts = resolve_bd3lm_options(request.sampling_params, self._defaults)
            request._blockdiff_options = opts
        return opts

    def add_request(self, request) -> None:
        super().add_request(request)
        # Tokens per forward, as SDLM reports windows: each denoising forward is a "draft" of a
        # block, of which the positions committed beyond the first are "accepted".
        request.spec_decode_metrics = RequestSpecDecodeMetrics.new(self._options(request).block_size - 1)

    def make_stats(self, spec_decoding_stats=None, *args, **kwargs):
        commits = self._step_commits
        if commits and self.log_stats:
            if spec_decoding_stats is None:
                spec_decoding_stats = SpecDecodingStats.new(self._defaults.block_size - 1)
            for req_id, n in commits.items():
                # A request finished by this step is gone already: its block size was kept.
                if n and req_id in self._step_block_sizes:
                    observe_block_forward(spec_decoding_stats, self._step_block_sizes[req_id], n)
        return super().make_stats(spec_decoding_stats, *args, **kwargs)

    # ---- structured outputs: left-frontier canvases (docs/design.md §15) ----------------------------
    def _frontier(self, placeholders) -> list[int]:
        """A constrained canvas's grammar-checked part: its placeholders before the first mask."""
        return bd3lm.committed_prefix(placeholders, self._defaults.mask_token_id)

    def get_grammar_bitmask(self, scheduler_output):
        """One bitmask row per constrained canvas, for its leftmost masked position: the grammar advanced
        over the canvas's frontier, filled, and rolled back. (vLLM's own would also skip the steps that
        re-encode a finished block, which it takes for prefill chunks.)"""
        ids = [req_id for req_id, placeholders in scheduler_output.scheduled_spec_decode_tokens.items()
               if placeholders and (request := self.requests.get(req_id)) is not None
               and request.use_structured_output and request.structured_output_request.grammar is not None]
        if not ids:
            return None
        bitmask = self.structured_output_manager.backend.allocate_token_bitmask(len(ids))
        for row, req_id in enumerate(ids):
            grammar = self.requests[req_id].structured_output_request.grammar
            frontier = self._frontier(scheduler_output.scheduled_spec_decode_tokens[req_id])
            advanced = 0
            if frontier:
                if not grammar.accept_tokens(req_id, frontier):  # cannot happen: the frontier was validated
                    raise RuntimeError(f"grammar rejected the validated frontier of request {req_id}")
                advanced = len(frontier)
            grammar.fill_bitmask(bitmask, row)
            if advanced:
                grammar.rollback(advanced)
        return GrammarOutput(ids, bitmask.numpy(), [0] * len(ids))

    def _check_frontiers(self, scheduler_output, model_runner_output) -> None:
        """Each constrained canvas's committed left part, cut at the first token its grammar rejects. A
        canvas the grammar accepts whole, or up to a stop token, is the step's output (the chunk ends);
        otherwise the next step's placeholders are the accepted frontier and masks."""
        frontiers = getattr(model_runner_output, "blockdiff_frontiers", None) or {}
        for req_id, frontier in frontiers.items():
            request = self.requests.get(req_id)
            index = model_runner_output.req_id_to_index.get(req_id)
            if request is None or index is None:
                continue
            before = len(self._frontier(scheduler_output.scheduled_spec_decode_tokens.get(req_id, ())))
            valid = self.structured_output_manager.validate_tokens(request, list(frontier))
            # Tokens per forward counts what the grammar kept.
            self._step_commits[req_id] = max(len(valid) - before, 0)
            params = request.sampling_params
            stops = set(params.all_stop_token_ids or ()) | {params.eos_token_id}
            canvas_len = getattr(request, "_blockdiff_canvas_len", 0)
            if len(valid) >= canvas_len or any(t in stops for t in valid):
                model_runner_output.sampled_token_ids[index] = valid
            else:  # kept with the chunk's start: a preempted request resumes its chunk with it
                request._blockdiff_frontier = (request.num_tokens, valid)

    def update_from_output(self, scheduler_output, model_runner_output):
        self._step_commits = dict(getattr(model_runner_output, "blockdiff_commits", None) or {})
        if getattr(model_runner_output, "blockdiff_frontiers", None):
            self._check_frontiers(scheduler_output, model_runner_output)
        for req_id, n in self._step_commits.items():
            request = self.requests.get(req_id)
            if request is not None and request.spec_decode_metrics is not None and n:
                request.spec_decode_metrics.observe(self._options(request).block_size - 1, n - 1)
        self._step_block_sizes = {req_id: self._options(self.requests[req_id]).block_size
                                  for req_id in self._step_commits if req_id in self.requests}
        try:
            outputs = self._update_from_output(scheduler_output, model_runner_output)
        finally:
            self._step_commits, self._step_block_sizes = {}, {}
        reattach_spec_decode_metrics(self, outputs)
        return outputs

    def _update_from_output(self, scheduler_output, model_runner_output):
        canvases = scheduler_output.scheduled_spec_decode_tokens
        had_canvas = set(canvases)
        # Canvas slots are not drafts: keep them out of vLLM's draft acceptance accounting.
        scheduler_output.scheduled_spec_decode_tokens = {}
        num_new = {}
        sampled = model_runner_output.sampled_token_ids
        for req_id, index in model_runner_output.req_id_to_index.items():
            num_new[req_id] = len(sampled[index]) if sampled else 0
        try:
            return super().update_from_output(scheduler_output, model_runner_output)
        finally:
            scheduler_output.scheduled_spec_decode_tokens = canvases
            for req_id in scheduler_output.num_scheduled_tokens:
                request = self.requests.get(req_id)
                if request is None or request.is_finished():
                    continue
                self._after_step(request, req_id in had_canvas, num_new.get(req_id, 0))

    def _after_step(self, request, had_canvas: bool, num_committed: int) -> None:
        opts = self._options(request)
        block = opts.block_size
        if not had_canvas and request.num_computed_tokens < request.num_tokens:
            # Prompt chunk in progress: keep only whole blocks.
            request.num_computed_tokens -= request.num_computed_tokens % block
            return
        if num_committed:
            chunk_start = request.num_tokens - num_committed
            request.num_computed_tokens = chunk_start - chunk_start % block
        else:
            request.num_computed_tokens = request.num_tokens
        chunk_len = bd3lm.next_chunk_len(
            request.num_tokens, request.num_output_tokens, opts.max_tokens, block
        )
        # Never claim slots past the context; vLLM ends the request there (length capped).
        chunk_len = min(chunk_len, self.max_model_len - request.num_tokens)
        request._blockdiff_canvas_len = chunk_len
        start, frontier = getattr(request, "_blockdiff_frontier", None) or (None, [])
        frontier = frontier[:chunk_len] if start == request.num_tokens else []
        request.spec_token_ids = frontier + [self._defaults.mask_token_id] * (chunk_len - len(frontier))


class SDLMScheduler(BlockDiffScheduler):
    """The window ``[x_{L-1}, MASK x (D-1)]`` rides on vLLM's draft-token path.

    With committed tokens ``x_0 .. x_{L-1}`` a running request keeps ``num_computed_tokens = L - 1``
    and D-1 mask placeholders, so a step schedules the tokens accepted last step (causal KV, kept)
    followed by ``x_{L-1}`` and the masks at their natural positions: exactly the window, whose
    first slot is the one ``x_{L-1}``'s causal KV will occupy next step. Window KV is therefore
    overwritten before anything reads it as context, and never hashed: prefix caching stops at
    ``num_tokens - 1``. The runner returns the accepted prefix (1..D tokens); vLLM appends it,
    cutting at eos, stop tokens and ``max_tokens``.

    ``self_speculative`` requests alternate between step kinds (``engine/sdlm.py``): a *draft*
    step (a window that commits nothing; its predictions are the draft), then *packed* verify
    steps (the drafts causally + D verify windows in scratch KV pages, placeholders for all of
    them), or a *fallback* window committing one token when no scratch region is free this step
    or the packed layout would pass the context.

    Acceptance is reported as vLLM's spec-decode statistics: each window (each verify pass) is a
    draft of D-1 tokens of which ``n - 1`` were accepted, so the mean acceptance length is the
    number of tokens committed per forward, per request (``CompletionOutput.spec_decode_metrics``)
    and in the Prometheus counters.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._num_masks = self._defaults.block_size - 1
        # Sizes vLLM's per-position acceptance statistics; the window is the "draft".
        self.num_spec_tokens = self._num_masks
        coordinator = self.kv_cache_manager.coordinator
        cache_blocks = coordinator.cache_blocks

        def cache_committed_kv_only(request, num_tokens: int) -> None:
            # Only slots holding committed tokens' causal KV may be hashed (``_sdlm_causal_kv``); the
            # window's slots hold window KV. vLLM calls this when it allocates a step's slots (0.32,
            # 0.33) and, from 0.33 on, again after appending the step's tokens, when num_tokens has
            # grown past the window: the bound is the step's, not num_tokens - 1.
            bound = getattr(request, "_sdlm_causal_kv", request.num_tokens - 1)
            cache_blocks(request, min(num_tokens, bound))

        coordinator.cache_blocks = cache_committed_kv_only

    def add_request(self, request) -> None:
        super().add_request(request)
        request.spec_decode_metrics = RequestSpecDecodeMetrics.new(self._num_masks)
        request._sdlm_causal_kv = request.num_tokens - 1
        request._sdlm_self_speculative = resolve_sdlm_options(
            request.sampling_params, self._defaults
        ).alg == "self_speculative"
        request._sdlm_has_draft = False

    def schedule(self, *args, **kwargs):
        num_packed = 0
        for request in self.running:
            # The slots with causal KV after this step: up to x_{L-2} (the window, or a prompt chunk,
            # rewrites slot L-1), up to x_{L-1} in a packed step (its causal segment writes it).
            request._sdlm_causal_kv = request.num_tokens - 1
            # Window-ready: at most the tokens accepted last step (<= D) lack causal KV; they are
            # computed in the same forward, ahead of the window (a longer prompt is prefilled first).
            if request.num_tokens - request.num_computed_tokens <= self._defaults.block_size + 1:
                kind = self._step_kind(request, packed_free=num_packed < self._scratch.num_requests)
                num_packed += kind == StepKind.PACKED
                request._sdlm_kind = kind
                request._sdlm_causal_kv += kind == StepKind.PACKED
                request.spec_token_ids = [self._defaults.mask_token_id] * self._num_placeholders(request, kind)
        # vLLM keeps one position free for the token sampled after the last scheduled one; the
        # window's masks *are* those positions (the runner never predicts past the context), and
        # without them a request one token short of max_model_len would have no window at all.
        self.num_sampled_tokens_per_step = 0
        try:
            return super().schedule(*args, **kwargs)
        finally:
            # Accounting in update_from_output: of n committed tokens, n - 1 were "drafts".
            self.num_sampled_tokens_per_step = 1

    def _step_kind(self, request, packed_free: bool) -> StepKind:
        if not request._sdlm_self_speculative:
            return StepKind.WINDOW
        if not request._sdlm_has_draft:
            return StepKind.DRAFT
        L, c = request.num_tokens, request.num_computed_tokens
        fits = packed_layout_fits(L, c, self._defaults, self._scratch) and (
            packed_num_scheduled(L, c, self._defaults.block_size, self._scratch.page_size)
            <= self.max_num_scheduled_tokens  # else it would be held back forever
        )
        return StepKind.PACKED if packed_free and fits else StepKind.FALLBACK

    def _num_placeholders(self, request, kind: StepKind) -> int:
        L, c = request.num_tokens, request.num_computed_tokens
        if kind == StepKind.PACKED:
            return packed_num_scheduled(L, c, self._defaults.block_size, self._scratch.page_size) - (L - c)
        # Masks never reach past the context (at least one fits while the request runs).
        return min(self._num_masks, self.max_model_len - L)

    def get_grammar_bitmask(self, scheduler_output):
        """Structured outputs: one bitmask row per constrained request, for window row 0 (the next
        token after what is committed). vLLM would fill a row per draft position by advancing the
        grammar through the drafts, here mask placeholders the grammar rejects; the later window
        rows are checked after the step instead (``_grammar_valid``)."""
        if not scheduler_output.has_structured_output_requests:
            return None
        ids = [req_id for req_id in scheduler_output.scheduled_spec_decode_tokens
               if (request := self.requests.get(req_id)) is not None and request.use_structured_output]
        if not ids:
            return None
        bitmask = self.structured_output_manager.grammar_bitmask(self.requests, ids, {})
        return GrammarOutput(ids, bitmask, [0] * len(ids))

    def _grammar_valid(self, scheduler_output, model_runner_output) -> None:
        """Cut each constrained request's committed run at the first token its grammar rejects (row 0
        was sampled under the grammar's bitmask, so at least that one stands)."""
        sampled = model_runner_output.sampled_token_ids
        for req_id in scheduler_output.scheduled_spec_decode_tokens:
            request = self.requests.get(req_id)
            index = model_runner_output.req_id_to_index.get(req_id)
            if request is None or not request.use_structured_output or index is None or not sampled[index]:
                continue
            sampled[index] = self.structured_output_manager.validate_tokens(request, list(sampled[index]))

    def update_from_output(self, scheduler_output, model_runner_output):
        if model_runner_output.sampled_token_ids:
            self._grammar_valid(scheduler_output, model_runner_output)
        windows = scheduler_output.scheduled_spec_decode_tokens
        num_tokens_before = {}
        for req_id, placeholders in list(windows.items()):
            request = self.requests.get(req_id)
            if request is None:
                continue
            num_tokens_before[req_id] = request.num_tokens
            # vLLM's acceptance statistics see every kind of step as a window of D-1 drafts.
            windows[req_id] = placeholders[: self._num_masks]
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for req_id in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(req_id)
            if request is None or request.is_finished():
                continue
            if req_id not in num_tokens_before:
                # Prompt chunk: once the prompt is in, x_{L-1} is recomputed as the window's start.
                request.num_computed_tokens = min(request.num_computed_tokens, request.num_tokens - 1)
                continue
            kind = request._sdlm_kind
            if kind == StepKind.PACKED:
                # The drafts' causal KV was written in place, up to the last committed token.
                request.num_computed_tokens = request.num_tokens - 1
            else:
                # The window rewrote slot L-1: x_{L-1}'s causal KV is computed next step.
                request.num_computed_tokens = num_tokens_before[req_id] - 1
            request._sdlm_has_draft = kind in (StepKind.DRAFT, StepKind.PACKED)
        reattach_spec_decode_metrics(self, outputs)
        return outputs
