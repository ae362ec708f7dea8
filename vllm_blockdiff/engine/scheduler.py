"""Scheduler side of block diffusion: claim canvas slots, keep ``num_computed_tokens`` honest.

vLLM schedules ``num_tokens_with_spec - num_computed_tokens`` tokens per request. We use the
speculative-token list as the *canvas*: each running request carries ``chunk_len`` placeholder
ids after its committed tokens, so ``allocate_slots`` gives the chunk KV slots in the paged
cache and every step re-schedules exactly those slots. Prefix-cache hashing stops at
``request.num_tokens`` (committed tokens), so mask slots are never cached.

After each step (``update_from_output``):
- prompt chunk that ended inside a diffusion block (but not at the prompt end): roll back to
  the block start, since a block must be encoded in one piece to be bidirectional;
- chunk finished (the runner returned its tokens): roll back to the block start so the next
  step re-encodes the whole block with clean tokens (the card's next prefix pass) together
  with the first denoising step of the next chunk;
- otherwise: drop the canvas from ``num_computed_tokens`` (it is rewritten every step).
"""

from __future__ import annotations

from vllm.v1.core.sched.scheduler import Scheduler

from vllm_blockdiff.algorithms import bd3lm
from vllm_blockdiff.config import model_defaults
from vllm_blockdiff.options import BD3LMOptions, resolve_bd3lm_options


class BlockDiffScheduler(Scheduler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Nothing is sampled "after" the last scheduled token: do not reserve a context slot.
        self.num_sampled_tokens_per_step = 0
        self._defaults = model_defaults(self.vllm_config)

    def _options(self, request) -> BD3LMOptions:
        opts = getattr(request, "_blockdiff_options", None)
        if opts is None:
            opts = resolve_bd3lm_options(request.sampling_params, self._defaults)
            request._blockdiff_options = opts
        return opts

    def schedule(self, *args, **kwargs):
        # A canvas must be computed whole. Hold back the running requests whose block does not
        # fit in this step's token budget instead of letting vLLM schedule part of it.
        budget = self.max_num_scheduled_tokens
        held_back = []
        kept = []
        for request in self.running:
            need = request.num_tokens_with_spec - request.num_computed_tokens
            if request.spec_token_ids and need > budget:
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

    def update_from_output(self, scheduler_output, model_runner_output):
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
        request.spec_token_ids = [self._defaults.mask_token_id] * chunk_len
