"""Attention segments: how one step's tokens of one request see the paged KV cache.

vLLM's attention kernels take, per row, a query span, a KV length (``seq_len``) and a block
table, and attend to KV slots ``[0, seq_len)``. A diffusion request's query is cut into
segments, each a row with its own ``seq_len`` and the request's block-table row repeated:

- BD3LM: every segment is one diffusion block (or the part of it scheduled this step) and is
  bidirectional with ``seq_len`` = its end, which gives exactly the block-causal
  ("staircase") mask: a token sees every earlier block and its whole block so far.
- The canvas (the mask slots being denoised) is one more bidirectional segment; it lies inside
  one block, so it sees the block's committed/prompt tokens and all earlier blocks.
- SDLM: the tokens accepted last step are one causal segment; the window ``[x_{L-1}, masks]`` is
  a bidirectional segment that ends the request's query. Mixed rows pass ``causal`` as a
  per-row int32 tensor (CPU_ATTN ``dynamic_causal``, TRITON_ATTN, FA4).

KV for all scheduled tokens is written before attention runs, so a later segment of the same
request sees the KV an earlier segment of the same step wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class CanvasRow:
    """Where one request's canvas (BD3LM) or window (SDLM) sits in this step's flattened query."""

    req_index: int
    req_id: str
    token_offset: int
    length: int
    # Positions (within the canvas) whose logits are computed: BD3LM the still-masked ones (only
    # they can commit), SDLM every window position.
    logit_positions: np.ndarray
    verify_row: int = -1  # SDLM self-speculative: which verify window of a packed step
    unconditional: bool = False  # BD3LM guidance: the canvas over the all-mask prefix


@dataclass
class StepReport:
    """What a family's sampling step tells the runner besides the committed tokens."""

    commits: dict[str, int] = field(default_factory=dict)  # req_id -> positions committed this step (BD3LM)
    frames: dict[str, dict] = field(default_factory=dict)  # req_id -> trace frame (trace option)
    # req_id -> the committed left part of a constrained BD3LM canvas (the scheduler checks it with the grammar)
    frontiers: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class StepPlan:
    """The segments of one forward pass plus the canvases whose logits are needed."""

    query_start: list[int] = field(default_factory=lambda: [0])
    seq_lens: list[int] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)
    causal: list[int] = field(default_factory=list)
    canvases: list[CanvasRow] = field(default_factory=list)
    # Segments whose block-table row points some pages elsewhere: (segment, first page, page ids).
    page_overrides: list[tuple[int, int, np.ndarray]] = field(default_factory=list)
    # Tokens whose position, id and KV slot are not the scheduler's (flat index, position, id, slot).
    token_overrides: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    num_scratch_requests: int = 0  # requests whose rows use scratch regions so far this step
    logprobs: object = None  # the step's sampled-token LogprobsTensors, when a request asked (SDLM)

    def add(self, owner: int, num_query: int, seq_len: int, causal: bool = False,
            pages: tuple[int, np.ndarray] | None = None) -> None:
        if pages is not None:
            self.page_overrides.append((self.num_segments, pages[0], pages[1]))
        self.query_start.append(self.query_start[-1] + num_query)
        self.seq_lens.append(seq_len)
        self.owners.append(owner)
        self.causal.append(int(causal))

    def override_tokens(self, flat_index, positions, token_ids, slots) -> None:
        self.token_overrides.append((flat_index, positions, token_ids, slots))

    @property
    def num_segments(self) -> int:
        return len(self.seq_lens)

    def logits_indices(self) -> np.ndarray:
        if not self.canvases:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([c.token_offset + c.logit_positions for c in self.canvases]).astype(np.int64)


def add_block_causal_segments(
    plan: StepPlan, owner: int, start: int, end: int, block_size: int,
    pages: tuple[int, np.ndarray] | None = None,
) -> None:
    """Tokens at absolute positions ``[start, end)``, cut at multiples of ``block_size``."""
    pos = start
    while pos < end:
        seg_end = min(end, (pos // block_size + 1) * block_size)
        plan.add(owner, seg_end - pos, seg_end, causal=False, pages=pages)
        pos = seg_end


def segmented_metadata(cm, plan: StepPlan):
    """A ``CommonAttentionMetadata`` whose rows are the plan's segments instead of requests."""
    device = cm.query_start_loc.device
    query_start_cpu = torch.tensor(plan.query_start, dtype=torch.int32)
    seq_lens_cpu = torch.tensor(plan.seq_lens, dtype=torch.int32)
    owners = torch.tensor(plan.owners, dtype=torch.long, device=cm.block_table_tensor.device)
    query_lens = np.diff(np.asarray(plan.query_start))
    if any(plan.causal):
        causal: bool | torch.Tensor = torch.tensor(plan.causal, dtype=torch.int32, device=device)
    else:
        causal = False
    block_table = cm.block_table_tensor.index_select(0, owners)
    if plan.page_overrides:
        segs, cols, ids = [], [], []
        for segment, first_page, pages in plan.page_overrides:
            segs.append(np.full(len(pages), segment))
            cols.append(first_page + np.arange(len(pages)))
            ids.append(pages)
        index = (torch.from_numpy(np.concatenate(segs)), torch.from_numpy(np.concatenate(cols)))
        block_table[tuple(t.to(block_table.device) for t in index)] = torch.from_numpy(
            np.concatenate(ids)).to(block_table.device, block_table.dtype)
    return cm.replace(
        query_start_loc=query_start_cpu.to(device),
        query_start_loc_cpu=query_start_cpu,
        seq_lens=seq_lens_cpu.to(device),
        seq_lens_cpu_upper_bound=seq_lens_cpu,
        num_reqs=plan.num_segments,
        max_query_len=int(query_lens.max()),
        max_seq_len=int(max(plan.seq_lens)),
        block_table_tensor=block_table,
        causal=causal,
        is_prefilling=torch.zeros(plan.num_segments, dtype=torch.bool),
        req_idx=np.asarray(plan.owners),
        _num_computed_tokens_cache=None,
        _token_to_req_indices_cache=None,
    )
