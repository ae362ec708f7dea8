"""Helpers shared by the patch modules."""

from __future__ import annotations


def serves_ours(model_config) -> bool:
    """Whether ``model_config`` is one of the plugin's architectures."""
    from vllm_blockdiff.config import family_of

    return model_config is not None and family_of(getattr(model_config, "architectures", None)) is not None


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
