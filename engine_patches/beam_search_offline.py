"""Refuse beam search for our models (`LLM.beam_search`).

Target: ``vllm.entrypoints.generate.beam_search.offline.BeamSearchOfflineMixin.beam_search``.
Why: vLLM's beam search calls the engine once per token with ``max_tokens=1, logprobs=2*beam``
and expands the beams from that one next-token distribution; a diffusion step commits a block
(BD3LM) or a window (SDLM), so the result would not be a beam search of either model, and for
BD3LM the logprobs it needs do not exist. Without this, the request failed deep inside the loop.
How: for our architectures the method raises ``VLLMValidationError`` naming
``use_beam_search`` when called (HTTP 400 before any response); other models call the original.
Upstream PR: none; removable if vLLM lets a model declare that it cannot beam-search.
Drift guard: raises at apply time if the method is gone; ``tests/engine/test_bd3lm_engine.py``
checks the refusal.
"""

from __future__ import annotations

from vllm.entrypoints.generate.beam_search import offline as upstream

from engine_patches._common import BEAM_SEARCH_REFUSAL, refuse_for_our_models


def apply() -> None:
    refuse_for_our_models(upstream.BeamSearchOfflineMixin, "beam_search", BEAM_SEARCH_REFUSAL, "use_beam_search")
