"""Validate diffusion options when a request is admitted.

Target: ``vllm.v1.engine.input_processor.InputProcessor._validate_params`` (the options) and
``InputProcessor.process_inputs`` (checks that need the tokenized prompt's length).
Why: a bad ``extra_args`` value (``steps=0``, unknown ``remasking``...) must be rejected in the
front end with a ``VLLMValidationError`` naming the parameter (HTTP 400 in ``vllm serve``,
``ValueError`` from ``LLM.generate``), never reach the engine loop where it would kill it.
vLLM has no hook for per-model sampling-parameter validation outside its built-in diffusion
config (Model Runner V2 only).
How: keep the originals, call them, then run ``vllm_blockdiff.options.validate_request`` when
the served architecture is one of ours (after ``process_inputs``, with the prompt length). There
too, a BD3LM request with a block size other than the served one gets a ``cache_salt`` naming it
(``options.prefix_cache_salt``): a token's KV depends on the block structure it was computed
under, so pages may only be shared between requests of the same block size.
Upstream PR: none; removable if vLLM grows a per-model ``validate_sampling_params`` hook.
Drift guard: raises at apply time if a method, ``_validate_params``'s signature or the
``prompt_token_ids``/``sampling_params``/``cache_salt`` fields of ``EngineCoreRequest`` are gone;
``tests/engine/test_bd3lm_engine.py``/``test_sdlm_engine.py``
(``test_bad_options_are_rejected_and_engine_keeps_serving``) and ``tests/serving/test_serve.py`` (HTTP
400) check the rejection end to end.
"""

from __future__ import annotations

import inspect

from vllm.exceptions import VLLMValidationError
from vllm.v1.engine import input_processor as upstream

_EXPECTED_PARAMS = ["self", "params", "supported_tasks"]


def _defaults(processor):
    cached = getattr(processor, "_blockdiff_defaults", None)
    if cached is None:
        from vllm_blockdiff.config import family_of, model_defaults

        vllm_config = processor.vllm_config
        family = family_of(vllm_config.model_config.architectures)
        cached = model_defaults(vllm_config) if family else False
        processor._blockdiff_defaults = cached
    return cached


def validate(processor, params, prompt_len: int | None = None) -> None:
    """The admission check for one request of ours (nothing for other models)."""
    defaults = _defaults(processor)
    if defaults and hasattr(params, "extra_args"):
        from vllm_blockdiff.options import OptionError, validate_request

        try:
            validate_request(params, defaults, prompt_len)
        except OptionError as err:
            raise VLLMValidationError(str(err), parameter=err.parameter) from None


def apply() -> None:
    cls = upstream.InputProcessor
    original = cls.__dict__.get("_validate_params")
    original_process = cls.__dict__.get("process_inputs")
    if getattr(original, "_blockdiff_patched", False):
        return
    fields = getattr(upstream.EngineCoreRequest, "__struct_fields__", ())
    if (
        original is None
        or original_process is None
        or list(inspect.signature(original).parameters) != _EXPECTED_PARAMS
        or not {"prompt_token_ids", "sampling_params", "cache_salt"} <= set(fields)
    ):
        raise RuntimeError(
            "engine_patches.input_processor: InputProcessor._validate_params / process_inputs "
            "changed upstream; update the patch"
        )

    def _validate_params(self, params, supported_tasks):
        result = original(self, params, supported_tasks)
        validate(self, params)
        return result

    def process_inputs(self, *args, **kwargs):
        request = original_process(self, *args, **kwargs)
        if request.sampling_params is not None and request.prompt_token_ids is not None:
            validate(self, request.sampling_params, len(request.prompt_token_ids))
            defaults = _defaults(self)
            if defaults:
                from vllm_blockdiff.options import prefix_cache_salt

                request.cache_salt = prefix_cache_salt(request.sampling_params, defaults, request.cache_salt)
        return request

    _validate_params._blockdiff_patched = True
    cls._validate_params = _validate_params
    cls.process_inputs = process_inputs
