"""Per-request diffusion options: read from ``SamplingParams.extra_args``, validated once at admission.

OpenAI clients send the same names through ``vllm_xargs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm_blockdiff.algorithms.bd3lm import REMASKING_MODES

BD3LM_OPTION_NAMES = ("steps", "block_size", "remasking", "cfg_scale")


class OptionError(ValueError):
    """A bad request option; ``parameter`` names it (vLLM turns this into HTTP 400)."""

    def __init__(self, message: str, parameter: str):
        super().__init__(message)
        self.parameter = parameter


@dataclass(frozen=True)
class ModelDefaults:
    """What the served checkpoint and engine fix for every request."""

    family: str  # "bd3lm" | "sdlm"
    mask_token_id: int
    block_size: int  # BD3LM default block / SDLM window D
    kv_page_size: int
    max_model_len: int
    max_step_tokens: int = 1 << 30  # scheduler token budget per step (max_num_batched_tokens)


@dataclass(frozen=True)
class BD3LMOptions:
    steps: int
    block_size: int
    remasking: str
    cfg_scale: float
    max_tokens: int
    temperature: float
    seed: int | None

    @property
    def steps_per_block(self) -> int:
        from vllm_blockdiff.algorithms.bd3lm import steps_per_block

        return steps_per_block(self.steps, self.max_tokens, self.block_size)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, message: str, parameter: str) -> None:
    if not ok:
        raise OptionError(message, parameter)


def resolve_bd3lm_options(params: Any, defaults: ModelDefaults) -> BD3LMOptions:
    """The request's effective BD3LM options; raises ``OptionError`` naming the bad field."""
    extra = dict(params.extra_args or {})
    unknown = sorted(set(extra) - set(BD3LM_OPTION_NAMES))
    _check(
        not unknown,
        f"unknown diffusion option(s) {unknown}; BD3LM accepts {list(BD3LM_OPTION_NAMES)}",
        unknown[0] if unknown else "extra_args",
    )
    max_tokens = params.max_tokens
    _check(_is_int(max_tokens) and max_tokens > 0, "max_tokens must be a positive integer", "max_tokens")

    steps = extra.get("steps", max_tokens)
    _check(_is_int(steps) and steps > 0, f"steps must be a positive integer, got {steps!r}", "steps")

    block_size = extra.get("block_size", defaults.block_size)
    _check(
        _is_int(block_size) and block_size > 0,
        f"block_size must be a positive integer, got {block_size!r}",
        "block_size",
    )
    # Prefix caching hashes whole KV pages; a page must never split a diffusion block.
    _check(
        defaults.kv_page_size % block_size == 0,
        f"block_size must divide the engine's KV page size {defaults.kv_page_size} "
        f"(got {block_size}); restart the server with a matching --block-size to use it",
        "block_size",
    )

    # A block's clean pass and the next canvas run in one step and are never split.
    _check(
        2 * block_size <= defaults.max_step_tokens,
        f"block_size {block_size} needs {2 * block_size} tokens per step, more than the engine's "
        f"max_num_batched_tokens {defaults.max_step_tokens}",
        "block_size",
    )
    remasking = extra.get("remasking", "low_confidence")
    _check(
        remasking in REMASKING_MODES,
        f"remasking must be one of {list(REMASKING_MODES)}, got {remasking!r}",
        "remasking",
    )
    cfg_scale = extra.get("cfg_scale", 0.0)
    _check(
        isinstance(cfg_scale, (int, float)) and not isinstance(cfg_scale, bool) and cfg_scale >= 0,
        f"cfg_scale must be a number >= 0, got {cfg_scale!r}",
        "cfg_scale",
    )
    _check(cfg_scale == 0, "cfg_scale > 0 is not supported by this engine yet", "cfg_scale")

    temperature = float(params.temperature)
    _check(temperature >= 0, "temperature must be >= 0", "temperature")
    _check(params.top_p == 1.0, "top_p is not part of BD3LM decoding; leave it at 1.0", "top_p")
    _check(params.top_k in (0, -1, None), "top_k is not part of BD3LM decoding; leave it unset", "top_k")
    _check(params.min_p == 0.0, "min_p is not part of BD3LM decoding; leave it at 0", "min_p")
    for name in ("presence_penalty", "frequency_penalty"):
        _check(getattr(params, name) == 0.0, f"{name} is not supported for diffusion decoding", name)
    _check(params.repetition_penalty == 1.0, "repetition_penalty is not supported for diffusion decoding",
           "repetition_penalty")
    _check(not params.min_tokens, "min_tokens is not supported for diffusion decoding", "min_tokens")
    _check(not params.logit_bias, "logit_bias is not supported for diffusion decoding", "logit_bias")
    _check(params.logprobs is None, "logprobs are not available for diffusion decoding", "logprobs")
    _check(params.prompt_logprobs is None, "prompt_logprobs are not available for diffusion decoding",
           "prompt_logprobs")
    return BD3LMOptions(
        steps=steps,
        block_size=block_size,
        remasking=remasking,
        cfg_scale=float(cfg_scale),
        max_tokens=max_tokens,
        temperature=temperature,
        seed=params.seed,
    )


def validate_request(params: Any, defaults: ModelDefaults, prompt_len: int | None = None) -> None:
    """Admission check for one request; raises ``OptionError``."""
    if defaults.family == "bd3lm":
        opts = resolve_bd3lm_options(params, defaults)
        if prompt_len is not None:
            _check(
                prompt_len + opts.max_tokens <= defaults.max_model_len,
                f"prompt ({prompt_len} tokens) + max_tokens ({opts.max_tokens}) exceeds the "
                f"model's context length {defaults.max_model_len}",
                "max_tokens",
            )
    else:  # pragma: no cover - SDLM arrives with its own options (issue 3)
        raise OptionError(f"unsupported model family {defaults.family!r}", "model")
