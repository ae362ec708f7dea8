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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vllm_blockdiff.algorithms import sdlm
from vllm_blockdiff.engine.segments import CanvasRow, StepPlan
from vllm_blockdiff.options import ModelDefaults, SDLMOptions, resolve_sdlm_options


@dataclass
class SDLMRequestState:
    options: SDLMOptions
    generator: torch.Generator


class SDLMSteps:
    """The SDLM family's part of :class:`~vllm_blockdiff.engine.runner.BlockDiffRunnerMixin`."""

    def __init__(self, defaults: ModelDefaults):
        self.defaults = defaults

    def new_state(self, params, generator: torch.Generator) -> SDLMRequestState:
        return SDLMRequestState(resolve_sdlm_options(params, self.defaults), generator)

    def place(self, token_ids: np.ndarray, start: int, placeholders: list[int], state: SDLMRequestState):
        """The placeholders already are the mask ids."""

    def plan(self, plan: StepPlan, req_index: int, req_id: str, state: SDLMRequestState,
             computed: int, num_sched: int, num_masks: int, offset: int) -> None:
        if not num_masks:
            plan.add(req_index, num_sched, computed + num_sched, causal=True)
            return
        num_causal = num_sched - num_masks - 1  # x_{L-1} opens the window
        if num_causal:
            plan.add(req_index, num_causal, computed + num_causal, causal=True)
        window = num_masks + 1
        plan.add(req_index, window, computed + num_sched, causal=self.defaults.window_causal)
        plan.canvases.append(CanvasRow(req_index, req_id, offset + num_causal, window, np.arange(window)))

    def sample(self, logits: torch.Tensor, plan: StepPlan, states: dict, out: torch.Tensor,
               num_tokens: np.ndarray) -> None:
        """Accepted prefixes of every window, written to ``out`` rows."""
        requests = []
        for row in plan.canvases:
            state = states[row.req_id]
            opts = state.options
            requests.append(
                sdlm.WindowRequest(
                    row.length,
                    threshold=opts.threshold,
                    temperature=opts.temperature,
                    top_p=opts.top_p,
                    top_k=opts.top_k,
                    entropy_conf=opts.entropy_conf,
                    # Every token self-speculative commits is the first prediction of the window
                    # after its prefix (drafts are only accepted when they equal it), so its output
                    # is first-token-only decoding. Its speed comes from verifying D drafts in one
                    # packed pass, which needs per-row scratch KV (docs/design.md); here each forward
                    # commits one token: the same output, one token per forward.
                    first_only=opts.alg == "self_speculative",
                    generator=state.generator,
                )
            )
        for row, tokens in zip(plan.canvases, sdlm.commit_windows(logits, requests)):
            # Never past the context: vLLM's runner refuses tokens beyond max_model_len.
            tokens = tokens[: self.defaults.max_model_len - int(num_tokens[row.req_index])]
            out[row.req_index, : len(tokens)] = torch.tensor(tokens, dtype=torch.int32)
