"""Shared helpers for the SDLM engine tests: request cases and their reference outputs."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from vllm import SamplingParams

from tests.reference.sdlm_reference import EOS_IDS, generate_sdlm


@dataclass(frozen=True)
class SDLMCase:
    max_tokens: int
    alg: str | None = None  # None: the default (prob_conf)
    threshold: float | None = None  # None: the default (0.5)
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def params(self, **overrides) -> SamplingParams:
        extra = {}
        if self.alg is not None:
            extra["alg"] = self.alg
        if self.threshold is not None:
            extra["threshold"] = self.threshold
        kw = dict(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                  seed=self.seed, extra_args=extra)
        kw.update(overrides)
        return SamplingParams(**kw)

    def reference(self, model, prompt: list[int], D: int, causal_window: bool = False) -> tuple[list[int], list[int]]:
        return generate_sdlm(
            model,
            prompt,
            max_new_tokens=self.max_tokens,
            D=D,
            threshold=0.5 if self.threshold is None else self.threshold,
            alg=self.alg or "prob_conf",
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            causal_window=causal_window,
        )


def run(llm, prompts: list[list[int]], params) -> list:
    """Completion outputs (``outputs[0]``) for token prompts, in order."""
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0] for o in outs]


def assert_matches_reference(completion, expected: list[int], max_tokens: int) -> None:
    """The engine's tokens are the reference's, plus the eos vLLM keeps when it stopped there."""
    got = list(completion.token_ids)
    assert got[: len(expected)] == expected, (got, expected)
    if len(expected) < max_tokens:  # the reference stopped at an eos it does not emit
        assert len(got) == len(expected) + 1 and got[-1] in EOS_IDS, (got, expected)
        assert completion.finish_reason == "stop"
    else:
        assert len(got) == max_tokens and completion.finish_reason == "length"


def accept_histogram(accept_lengths: list[int], D: int) -> list[int]:
    """vLLM's per-request spec-decode histogram: index j counts windows that committed j + 1 tokens."""
    counts = Counter(accept_lengths)
    return [counts.get(j + 1, 0) for j in range(D)]
