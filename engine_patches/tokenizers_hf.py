"""Load SDLM tokenizers the way SDLM's own inference does: no end-of-text token appended.

Target: ``vllm.tokenizers.hf.CachedHfTokenizer.from_pretrained``.
Why: SDLM checkpoints ship the slow Qwen2 tokenizer files (``vocab.json``, ``merges.txt``, no
``tokenizer.json``) with ``"add_eos_token": true`` in ``tokenizer_config.json``, saved by SDLM's
training under transformers 4.37.2, where the flag does nothing for Qwen2: SDLM's inference
(``tokenizer([chat_text])``) gets no trailing ``<|endoftext|>``. Transformers 5 honours the flag,
so vLLM's completion path (``add_special_tokens=True``) appended ``<|endoftext|>`` (151643, one
of SDLM's eos ids) to every prompt, and the model continued after an end of text.
How: for a checkpoint whose config names an SDLM architecture, pass ``add_eos_token=False``
(unless the caller set it), which transformers 5 applies to the loaded tokenizer. Chat prompts
are unaffected either way (vLLM renders them with ``add_special_tokens=False``).
Upstream PR: none; a checkpoint fix (``add_eos_token: false``) would make it unnecessary.
Drift guard: raises at apply time if ``from_pretrained`` is gone or stops taking a ``config``
keyword through ``**kwargs``; ``tests/serving/test_published_layouts.py`` serves the slow-tokenizer
SDLM layout and compares the prompt's token count.
"""

from __future__ import annotations

import inspect

from vllm.tokenizers import hf as upstream

from engine_patches._common import serves_ours


def _is_sdlm(config) -> bool:
    from vllm_blockdiff.config import SDLM_ARCHITECTURES

    return serves_ours(config) and bool(set(config.architectures) & set(SDLM_ARCHITECTURES))


def apply() -> None:
    cls = upstream.CachedHfTokenizer
    original = cls.__dict__.get("from_pretrained")
    function = getattr(original, "__func__", None)
    if getattr(function, "_blockdiff_patched", False):
        return
    if function is None or inspect.Parameter.VAR_KEYWORD not in {
        p.kind for p in inspect.signature(function).parameters.values()
    }:
        raise RuntimeError("engine_patches.tokenizers_hf: CachedHfTokenizer.from_pretrained changed upstream; "
                           "update the patch")

    def from_pretrained(cls, path_or_repo_id, *args, **kwargs):
        if _is_sdlm(kwargs.get("config")):
            kwargs.setdefault("add_eos_token", False)
        return function(cls, path_or_repo_id, *args, **kwargs)

    from_pretrained._blockdiff_patched = True
    cls.from_pretrained = classmethod(from_pretrained)
