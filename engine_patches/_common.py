"""Helpers shared by the patch modules."""

from __future__ import annotations


def serves_ours(model_config) -> bool:
    """Whether ``model_config`` is one of the plugin's architectures."""
    from vllm_blockdiff.config import family_of

    return model_config is not None and family_of(getattr(model_config, "architectures", None)) is not None


BEAM_SEARCH_REFUSAL = ("use_beam_search is not supported for block-diffusion models: beam search expands one "
                       "next-token distribution per step, a diffusion step commits a block (BD3LM) or a window (SDLM)")


def refuse_for_our_models(cls, name: str, message: str, parameter: str) -> None:
    """Wrap ``cls.<name>`` (a method of an object with ``model_config``) so that for our models it
    raises ``VLLMValidationError(message, parameter=...)`` when called (an async generator too: the
    replacement is a plain function, so the error comes before any response starts)."""
    from vllm.exceptions import VLLMValidationError

    original = cls.__dict__.get(name)
    if getattr(original, "_blockdiff_patched", False):
        return
    if original is None:
        raise RuntimeError(f"engine_patches: {cls.__name__}.{name} is gone upstream; update the patch")

    def refusing(self, *args, **kwargs):
        if serves_ours(getattr(self, "model_config", None)):
            raise VLLMValidationError(message, parameter=parameter)
        return original(self, *args, **kwargs)

    refusing._blockdiff_patched = True
    refusing.__wrapped__ = original
    setattr(cls, name, refusing)


# Request fields vLLM removed (0.12) and now ignores with a warning for every model; for our models a
# request carrying one asks for constraints it would not get, so it is refused instead.
REMOVED_GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
                         "guided_decoding_backend", "guided_whitespace_pattern")


def refuse_guided_fields(cls, name: str) -> None:
    """Wrap the async request handler ``cls.<name>(self, request, ...)`` of an OpenAI serving class so
    that, for our models, a request with a removed ``guided_*`` field is a 400 naming it."""
    from vllm.exceptions import VLLMValidationError

    original = cls.__dict__.get(name)
    if getattr(original, "_blockdiff_patched", False):
        return
    if original is None:
        raise RuntimeError(f"engine_patches: {cls.__name__}.{name} is gone upstream; update the patch")

    async def handler(self, request, *args, **kwargs):
        if serves_ours(getattr(self, "model_config", None)):
            for field in REMOVED_GUIDED_FIELDS:
                if field in (getattr(request, "model_extra", None) or {}):
                    raise VLLMValidationError(
                        f"{field} is not supported: vLLM removed the guided_* fields (they would be ignored); "
                        "use structured_outputs or response_format", parameter=field)
        return await original(self, request, *args, **kwargs)

    handler._blockdiff_patched = True
    handler.__wrapped__ = original
    setattr(cls, name, handler)
