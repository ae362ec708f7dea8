"""Scratch KV pages: the top of the paged KV cache, kept out of the scheduler's block pool.

Some attention rows need keys/values that are not the request's own sequence: SDLM's
self-speculative verify rows (each a different causal tail plus its window) and BD3LM's
unconditional rows for classifier-free guidance (an all-mask prefix). vLLM's attention reads a
row's KV through a block-table row, page by page, so such a row gets a block-table row whose
pages from some page on are scratch pages, and the tokens that fill them are scheduled in the
same forward with their KV slots pointed there (``StepPlan.page_overrides`` /
``StepPlan.override_tokens``). Both sides size the pool from the config alone: the scheduler
shrinks its pool by ``num_pages`` (``SDLMScheduler``/``BD3LMScheduler``), the runner owns pages
``[num_blocks - num_pages, num_blocks)``.

Layout: ``num_shared`` pages of one shared sequence (BD3LM: the all-mask prefix, identical for
every request), then per-forward regions: ``num_requests`` request slots, each with
``rows_per_request`` regions of ``pages_per_region`` pages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_SCRATCH_REQUESTS = 16  # requests per forward whose rows use scratch regions


@dataclass(frozen=True)
class ScratchPages:
    page_size: int
    num_shared: int
    rows_per_request: int
    pages_per_region: int
    num_requests: int

    @property
    def num_pages(self) -> int:
        return self.num_shared + self.num_requests * self.rows_per_request * self.pages_per_region

    def shared(self, first_page: int) -> np.ndarray:
        return first_page + np.arange(self.num_shared)

    def region(self, first_page: int, request_slot: int, row: int) -> np.ndarray:
        index = request_slot * self.rows_per_request + row
        return first_page + self.num_shared + index * self.pages_per_region + np.arange(self.pages_per_region)

    @classmethod
    def for_config(cls, vllm_config) -> ScratchPages:
        hf_config = vllm_config.model_config.hf_config
        P = vllm_config.cache_config.block_size
        B = hf_config.blockdiff_block_size  # BD3LM default block / SDLM window D
        requests = min(MAX_SCRATCH_REQUESTS, vllm_config.scheduler_config.max_num_seqs)
        if hf_config.blockdiff_family == "sdlm":
            # Verify row i: the last page's tail (< P tokens), drafts y_0..y_{i-1} (< D), the window (D).
            return cls(P, 0, B, math.ceil((P - 1 + 2 * B - 1) / P), requests)
        # CFG: the all-mask prefix for the whole context once; per request one unconditional row:
        # all-mask tokens from the page holding the block start (< P) and the canvas (<= B).
        max_model_len = vllm_config.model_config.max_model_len
        return cls(P, math.ceil(max_model_len / P), 1, math.ceil((P - 1 + B) / P), requests)


class ScratchUser:
    """Base of a family's runner steps that place rows in scratch pages (``SDLMSteps``,
    ``BD3LMSteps``): the pool's size comes from the config, its first page from the KV cache."""

    def __init__(self, vllm_config):
        self.scratch = ScratchPages.for_config(vllm_config)
        self.scratch_first_page: int | None = None  # known once the KV cache exists

    def kv_cache_ready(self, kv_cache_config) -> None:
        self.scratch_first_page = kv_cache_config.num_blocks - self.scratch.num_pages

    def claim_request_slot(self, plan) -> int:
        """The next request slot of this step's scratch regions (``StepPlan.num_scratch_requests``)."""
        slot = plan.num_scratch_requests
        assert slot < self.scratch.num_requests, "the scheduler gives scratch rows to at most num_requests per step"
        plan.num_scratch_requests += 1
        return slot


def slots_of(positions: np.ndarray, pages: np.ndarray, first_position: int, page_size: int) -> np.ndarray:
    """KV slots of ``positions`` laid out from ``first_position`` over ``pages``."""
    offset = positions - first_position
    return pages[offset // page_size] * page_size + offset % page_size
