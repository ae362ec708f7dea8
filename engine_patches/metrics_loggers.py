"""Count SDLM windows and BD3LM denoising forwards in vLLM's Prometheus spec-decode counters.

Target: ``vllm.v1.metrics.loggers.PrometheusStatLogger.__init__`` (its ``spec_decoding_prom``,
a ``vllm.v1.spec_decode.metrics.SpecDecodingProm``).
Why: an SDLM step is a draft-and-verify step: the window drafts D-1 tokens past the next one
and keeps the accepted prefix. ``SDLMScheduler`` reports every window as vLLM's
``SpecDecodingStats`` (drafts, draft tokens, accepted tokens per position), which the engine
ships to the front end, but ``SpecDecodingProm`` only creates its counters when a
``--speculative-config`` is given, so the numbers were dropped. With the counters on,
``vllm:spec_decode_num_drafts`` counts windows, ``..._num_accepted_tokens`` the tokens committed
beyond the first, and ``1 + accepted / drafts`` is the tokens committed per forward.
How: keep the original ``__init__``, call it, then, for our checkpoints (no speculative config is
allowed with them), rebuild ``spec_decoding_prom`` with a stand-in config saying
``num_speculative_tokens = D - 1`` (SDLM) or ``block_size - 1`` (BD3LM's served block; the only
field it reads).
Upstream PR: none; removable if vLLM lets a model declare draft-style statistics without a
speculative config.
Drift guard: raises at apply time if ``SpecDecodingProm.__init__`` no longer takes
``(speculative_config, labelnames, per_engine_labelvalues, is_diffusion)`` or the logger loses
``per_engine_labelvalues``; ``tests/engine/test_sdlm_trained.py`` and ``tests/serving`` read the counters end to end.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

from vllm.v1.metrics import loggers as upstream
from vllm.v1.spec_decode.metrics import SpecDecodingProm

_EXPECTED_PROM_PARAMS = ["self", "speculative_config", "labelnames", "per_engine_labelvalues", "is_diffusion"]
_LABEL_NAMES = ["model_name", "engine"]  # PrometheusStatLogger's labels


def apply() -> None:
    cls = upstream.PrometheusStatLogger
    original = cls.__dict__["__init__"]
    if getattr(original, "_blockdiff_patched", False):
        return
    if list(inspect.signature(SpecDecodingProm.__init__).parameters) != _EXPECTED_PROM_PARAMS:
        raise RuntimeError(
            "engine_patches.metrics_loggers: SpecDecodingProm.__init__ changed upstream; update the patch"
        )

    def __init__(self, vllm_config, *args, **kwargs):
        original(self, vllm_config, *args, **kwargs)
        hf_config = vllm_config.model_config.hf_config
        if getattr(hf_config, "blockdiff_family", None) is None or vllm_config.speculative_config is not None:
            return
        if not hasattr(self, "per_engine_labelvalues"):
            raise RuntimeError(
                "engine_patches.metrics_loggers: PrometheusStatLogger.per_engine_labelvalues is gone upstream"
            )
        window_drafts = SimpleNamespace(num_speculative_tokens=hf_config.blockdiff_block_size - 1)
        self.spec_decoding_prom = self._spec_decoding_cls(window_drafts, _LABEL_NAMES, self.per_engine_labelvalues)

    __init__._blockdiff_patched = True
    cls.__init__ = __init__
