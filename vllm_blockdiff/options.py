"""Per-request diffusion options: read from ``SamplingParams.extra_args``, validated once at admission.

OpenAI clients send the same names through ``vllm_xargs``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from vllm_blockdiff.algorithms import sdlm
from vllm_blockdiff.algorithms.bd3lm import REMASKING_MODES

BD3LM_OPTION_NAMES = ("steps", "block_size", "remasking", "cfg_scale", "threshold", "factor", "trace")
SDLM_OPTION_NAMES = ("alg", "threshold", "trace")


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
    window_causal: bool = False  # SDLM ``causal_attn``: causal attention inside the window


@dataclass(frozen=True)
class BD3LMOptions:
    steps: int
    block_size: int
    remasking: str
    cfg_scale: float
    max_tokens: int
    temperature: float
    seed: int | None
    trace: bool = False  # stream every step's canvas (docs/design.md §10)
    threshold: float | None = None  # parallel decoding: also commit every masked position above it
    factor: float | None = None  # parallel decoding, Fast-dLLM's factor rule
    left_frontier: bool = False  # structured outputs: commit only from the leftmost mask (design.md §15)

    @property
    def steps_per_block(self) -> int:
        from vllm_blockdiff.algorithms.bd3lm import steps_per_block

        return steps_per_block(self.steps, self.max_tokens, self.block_size)


@dataclass(frozen=True)
class SDLMOptions:
    alg: str
    threshold: float
    window: int  # D, fixed by the checkpoint
    temperature: float
    top_p: float
    top_k: int  # <= 0: off
    seed: int | None
    trace: bool = False  # stream every step's window (docs/design.md §10)
    logprobs: int | None = None  # top-k log-probabilities of each committed token's window row

    @property
    def entropy_conf(self) -> bool:
        return self.alg == "entropy_conf"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, message: str, parameter: str) -> None:
    if not ok:
        raise OptionError(message, parameter)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_unknown(extra: dict, known: tuple[str, ...], family: str) -> None:
    from vllm_blockdiff.request_fields import OPENAI_FIELDS

    unknown = sorted(set(extra) - set(known))
    for name in unknown:  # request fields vLLM passes through extra_args (kv_transfer_params, ...)
        if name in OPENAI_FIELDS:
            _check(False, f"{name} is not supported for {family} decoding: {OPENAI_FIELDS[name].note}", name)
    _check(
        not unknown,
        f"unknown diffusion option(s) {unknown}; {family} accepts {list(known)}",
        unknown[0] if unknown else "extra_args",
    )


def _trace_flag(extra: dict) -> bool:
    trace = extra.get("trace", False)
    # The OpenAI server's vllm_xargs holds numbers and strings: JSON true arrives as 1.
    _check(isinstance(trace, bool) or (_is_int(trace) and trace in (0, 1)),
           f"trace must be true or false (1 or 0), got {trace!r}", "trace")
    return bool(trace)


_DEFAULT_PARAMS: dict[type, Any] = {}


def _is_set(params: Any, name: str) -> bool:
    """Whether a request field differs from its class's default (unset lists and dicts count as unset)."""
    cls = type(params)
    if cls not in _DEFAULT_PARAMS:
        _DEFAULT_PARAMS[cls] = cls()
    value = getattr(params, name, None)
    return value not in (None, [], {}, ()) and value != getattr(_DEFAULT_PARAMS[cls], name, None)


def check_request_fields(params: Any, family: str) -> None:
    """Refuse, naming it, every standard field the family's decoder cannot honour
    (``request_fields.SAMPLING_FIELDS``), and every field that table does not know."""
    from vllm_blockdiff.request_fields import REFUSED, SAMPLING_FIELDS

    for name in getattr(type(params), "__struct_fields__", ()):
        rule = SAMPLING_FIELDS.get(name)
        if rule is None:
            _check(not _is_set(params, name), f"{name} is not supported by vllm_blockdiff (a field it does "
                   "not know; it would be ignored)", name)
        elif rule.status(family) == REFUSED:
            _check(not _is_set(params, name), f"{name} is not supported for {family.upper()} decoding: "
                   f"{rule.refusal or rule.note}", name)


def _temperature(params: Any) -> float:
    temperature = float(params.temperature)
    _check(temperature >= 0, "temperature must be >= 0", "temperature")
    return temperature


def resolve_bd3lm_options(params: Any, defaults: ModelDefaults) -> BD3LMOptions:
    """The request's effective BD3LM options; raises ``OptionError`` naming the bad field."""
    extra = dict(params.extra_args or {})
    _check_unknown(extra, BD3LM_OPTION_NAMES, "BD3LM")
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
        _is_number(cfg_scale) and cfg_scale >= 0,
        f"cfg_scale must be a number >= 0, got {cfg_scale!r}",
        "cfg_scale",
    )
    # The shared all-mask prefix of guidance is computed for the served block size only.
    _check(
        cfg_scale == 0 or block_size == defaults.block_size,
        f"cfg_scale > 0 needs the served block_size {defaults.block_size} (got {block_size})",
        "cfg_scale",
    )

    check_request_fields(params, "bd3lm")
    threshold, factor = extra.get("threshold"), extra.get("factor")
    _check(threshold is None or factor is None, "threshold and factor are two parallel-decoding rules; "
           "give one of them", "factor")
    _check(threshold is None or (_is_number(threshold) and 0 <= threshold <= 1),
           f"threshold must be a number in [0, 1] (a confidence), got {threshold!r}", "threshold")
    _check(factor is None or (_is_number(factor) and factor > 0),
           f"factor must be a number > 0, got {factor!r}", "factor")
    _check(remasking == "low_confidence" or (threshold is None and factor is None),
           "threshold and factor compare the model's confidence; they need remasking low_confidence",
           "threshold" if threshold is not None else "factor")
    constrained = params.structured_outputs is not None
    _check(not constrained or not cfg_scale, "structured_outputs are enforced without classifier-free guidance "
           "(cfg_scale 0): the guided placeholders leave no room for the grammar-checked canvas", "cfg_scale")
    _check(not constrained or not params.ignore_eos, "structured_outputs end at the grammar's eos; ignore_eos "
           "would decode past the end of the grammar", "ignore_eos")
    temperature = _temperature(params)
    return BD3LMOptions(
        left_frontier=constrained,
        threshold=None if threshold is None else float(threshold),
        factor=None if factor is None else float(factor),
        steps=steps,
        block_size=block_size,
        remasking=remasking,
        cfg_scale=float(cfg_scale),
        trace=_trace_flag(extra),
        max_tokens=max_tokens,
        temperature=temperature,
        seed=params.seed,
    )


def resolve_sdlm_options(params: Any, defaults: ModelDefaults) -> SDLMOptions:
    """The request's effective SDLM options; raises ``OptionError`` naming the bad field."""
    extra = dict(params.extra_args or {})
    _check_unknown(extra, SDLM_OPTION_NAMES, "SDLM")
    alg = extra.get("alg", sdlm.DEFAULT_ALGORITHM)
    _check(alg in sdlm.ALGORITHMS, f"alg must be one of {list(sdlm.ALGORITHMS)}, got {alg!r}", "alg")
    threshold = extra.get("threshold", sdlm.DEFAULT_THRESHOLD)
    # Confidences lie in [0, 1]: 0 accepts up to D tokens per step, anything >= 1 exactly one.
    _check(
        _is_number(threshold) and threshold >= 0,
        f"threshold must be a finite number >= 0, got {threshold!r}",
        "threshold",
    )
    check_request_fields(params, "sdlm")
    temperature = _temperature(params)
    # A self-speculative token commits from the window of an earlier step (the draft).
    _check(params.logprobs is None or alg != "self_speculative",
           "logprobs are available with alg prob_conf and entropy_conf, not self_speculative", "logprobs")
    _check(params.structured_outputs is None or alg != "self_speculative",
           "structured_outputs are enforced with alg prob_conf and entropy_conf, not self_speculative (its "
           "tokens commit from drafts of an earlier window, which the grammar's bitmask never saw)",
           "structured_outputs")
    top_k = params.top_k if params.top_k is not None else 0
    return SDLMOptions(
        alg=alg,
        threshold=float(threshold),
        window=defaults.block_size,
        temperature=temperature,
        top_p=float(params.top_p),
        top_k=int(top_k),
        seed=params.seed,
        trace=_trace_flag(extra),
        logprobs=params.logprobs,
    )


def resolve_options(params: Any, defaults: ModelDefaults) -> BD3LMOptions | SDLMOptions:
    if defaults.family == "sdlm":
        return resolve_sdlm_options(params, defaults)
    return resolve_bd3lm_options(params, defaults)


def validate_request(params: Any, defaults: ModelDefaults, prompt_len: int | None = None) -> None:
    """Admission check for one request; raises ``OptionError``. ``prompt_len`` adds the checks
    that need the tokenized prompt."""
    opts = resolve_options(params, defaults)
    if isinstance(opts, BD3LMOptions) and opts.cfg_scale and prompt_len is not None:
        # A guided step schedules the canvas twice plus up to a page of all-mask tokens (the
        # unconditional row, engine/bd3lm.py) and must fit the context.
        room = defaults.kv_page_size + opts.block_size
        _check(
            prompt_len + opts.max_tokens + room <= defaults.max_model_len,
            f"with cfg_scale > 0, prompt ({prompt_len} tokens) + max_tokens ({opts.max_tokens}) must leave "
            f"{room} tokens of the model's context length {defaults.max_model_len} free",
            "max_tokens",
        )


def prefix_cache_salt(params: Any, defaults: ModelDefaults, salt: str | None) -> str | None:
    """The request's prefix-cache salt: BD3LM KV depends on the diffusion block structure (a token sees
    its whole block), so a request with another block size than the served one must never share KV
    pages with it; the user's own salt is kept in front."""
    if defaults.family != "bd3lm":
        return salt
    block_size = (params.extra_args or {}).get("block_size", defaults.block_size)
    if block_size == defaults.block_size:
        return salt
    return f"{salt or ''}\x1fvllm_blockdiff block_size={block_size}"
