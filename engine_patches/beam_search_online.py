"""Refuse beam search for our models (the OpenAI server's `use_beam_search`).

Target: ``vllm.entrypoints.generate.beam_search.online.BeamSearchOnlineMixin.beam_search``.
Why: as ``engine_patches/beam_search_offline.py`` (beam search expands one next-token distribution per
step; a diffusion step commits a block or a window), for requests with ``use_beam_search``.
How: for our architectures the method raises ``VLLMValidationError`` naming
``use_beam_search`` when called (HTTP 400 before any response); other models call the original.
Upstream PR: none; removable if vLLM lets a model declare that it cannot beam-search.
Drift guard: raises at apply time if the method is gone; ``tests/serving/test_request_fields.py``
checks the refusal.
"""

from __future__ import annotations

from vllm.entrypoints.generate.beam_search import online as upstream

from engine_patches._common import BEAM_SEARCH_REFUSAL, refuse_for_our_models


def apply() -> None:
    refuse_for_our_models(upstream.BeamSearchOnlineMixin, "beam_search", BEAM_SEARCH_REFUSAL, "use_beam_search")
