"""Refuse a request with bad diffusion options before its response starts, streamed or not.

Target: ``vllm.v1.engine.async_llm.AsyncLLM.generate``.
Why: ``AsyncLLM.generate`` is an async generator: a request is processed, and validated
(``engine_patches/input_processor.py``), only when the generator is first iterated. The OpenAI
server iterates a *streamed* request's generator inside its ``StreamingResponse``, after the
HTTP 200 went out, so a bad option there became an error event inside a 200 stream, while the
same request unstreamed got a 400.
How: keep the original; for our models the replacement, a plain function, runs the admission
checks when it is *called*, in the order ``process_inputs`` runs them (vLLM's own
``InputProcessor._validate_params`` on a copy of the params, which includes ours, then the
prompt-length check), raising ``VLLMValidationError``, which the server's exception handler turns
into the same 400 body as the unstreamed request; then it returns the original generator.
Models that are not ours: the original, untouched.
Upstream PR: none; removable if vLLM validates requests before starting a stream.
Drift guard: raises at apply time if ``generate`` is gone or no longer takes
``prompt``/``sampling_params``; ``tests/serving/test_request_fields.py`` sends every refused
field streamed and unstreamed and compares the two 400 bodies.
"""

from __future__ import annotations

import inspect

from vllm.sampling_params import SamplingParams
from vllm.v1.engine import async_llm as upstream

from engine_patches._common import serves_ours
from engine_patches.input_processor import validate

_NEEDED = {"self", "prompt", "sampling_params"}


def _prompt_len(prompt) -> int | None:
    if isinstance(prompt, dict):
        token_ids = prompt.get("prompt_token_ids")
    else:
        token_ids = getattr(prompt, "prompt_token_ids", None)
    return len(token_ids) if token_ids is not None else None


def apply() -> None:
    cls = upstream.AsyncLLM
    original = cls.__dict__.get("generate")
    if getattr(original, "_blockdiff_patched", False):
        return
    if original is None or not set(inspect.signature(original).parameters) >= _NEEDED:
        raise RuntimeError("engine_patches.async_llm: AsyncLLM.generate changed upstream; update the patch")
    signature = inspect.signature(original)

    def generate(self, *args, **kwargs):
        processor = self.input_processor
        if serves_ours(processor.vllm_config.model_config):
            bound = signature.bind(self, *args, **kwargs)
            params = bound.arguments["sampling_params"]
            if isinstance(params, SamplingParams):
                processor._validate_params(params.clone(), ("generate",))  # our models only generate
                validate(processor, params, _prompt_len(bound.arguments["prompt"]))
        return original(self, *args, **kwargs)

    generate._blockdiff_patched = True
    cls.generate = generate
