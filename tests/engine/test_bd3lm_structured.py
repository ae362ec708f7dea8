"""BD3LM structured outputs: left-frontier commits under vLLM's structured-output manager (xgrammar), on the
trained digits model (``vllm_blockdiff.testing.trained_bd3lm``). The leftmost masked position is sampled
under the grammar's bitmask, a step commits a run from there, and the scheduler keeps the part the grammar
accepts (docs/design.md §15). Token-exact against a reference written from that rule with a hand-written
grammar for ``[0-9]+``."""

from __future__ import annotations

import json
import re

import pytest
import torch
from vllm import SamplingParams
from vllm.sampling_params import StructuredOutputsParams

from tests.conftest import inproc_engine, truncate_at_stop
from tests.reference import load_reference_model
from tests.reference.bd3lm_reference import generate_bd3lm_left_frontier

MAX_TOKENS = 32
DIGITS = StructuredOutputsParams(regex="[0-9]+")
RULES = {"card": {}, "threshold_0.9": {"threshold": 0.9}, "factor_1": {"factor": 1.0}}


@pytest.fixture(scope="module")
def llm(digits_ckpt):
    yield from inproc_engine(digits_ckpt, max_num_seqs=32)


@pytest.fixture(scope="module")
def ref_model(digits_ckpt, reference_threads):
    return load_reference_model(digits_ckpt)


@pytest.fixture(scope="module")
def prompts():
    from vllm_blockdiff.testing.trained_bd3lm import encode, heldout_prompts

    return [encode(t)[0] for t in heldout_prompts(8, seed=7)]


class DigitsThenStop:
    """``[0-9]+`` as xgrammar enforces it: tokens made only of ASCII digits, then (after one) a stop token."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids):
        self.digits = {i for s, i in tokenizer.get_vocab().items() if s.isascii() and s.isdigit()}
        self.stops = set(stop_ids)
        self.vocab_size = vocab_size

    def allowed(self, output: list[int]) -> torch.Tensor:
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        mask[sorted(self.digits)] = True
        if output:
            mask[sorted(self.stops)] = True
        return mask

    def valid_prefix(self, output: list[int], tokens: list[int]) -> list[int]:
        valid = []
        for t in tokens:
            if t in self.digits:
                valid.append(t)
            elif t in self.stops and (output or valid):
                return valid + [t]
            else:
                break
        return valid


def _params(structured=None, max_tokens=MAX_TOKENS, **extra):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, structured_outputs=structured,
                          extra_args={"steps": max_tokens, **extra})


def _run(llm, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0] for o in outs]


@pytest.mark.parametrize("rule", list(RULES))
def test_left_frontier_under_a_grammar_matches_the_reference(llm, ref_model, prompts, rule):
    from tests.conftest import STOP_IDS

    tokenizer = llm.get_tokenizer()
    grammar = DigitsThenStop(tokenizer, ref_model.config.vocab_size, STOP_IDS)
    for prompt, completion in zip(prompts, _run(llm, prompts, _params(DIGITS, **RULES[rule]))):
        forwards: list[int] = []
        expected = generate_bd3lm_left_frontier(ref_model, prompt, grammar, max_new_tokens=MAX_TOKENS,
                                                steps=MAX_TOKENS, stop_ids=STOP_IDS, forwards=forwards,
                                                **RULES[rule])
        assert list(completion.token_ids) == truncate_at_stop(expected), rule
        assert re.fullmatch("[0-9]+", completion.text), completion.text
        assert sum(completion.spec_decode_metrics.histogram) == forwards[0], rule


def test_a_grammar_the_model_follows_keeps_its_parallelism(llm, prompts):
    free = _run(llm, prompts, _params(threshold=0.9))
    constrained = _run(llm, prompts, _params(DIGITS, threshold=0.9))

    def per_forward(completions):
        return sum(len(c.token_ids) for c in completions) / sum(sum(c.spec_decode_metrics.histogram)
                                                                  for c in completions)

    assert all(re.fullmatch("[0-9]+", c.text) for c in constrained)
    assert per_forward(constrained) >= 2.0
    assert per_forward(constrained) >= 0.8 * per_forward(free)


def test_a_grammar_the_model_cannot_follow_still_gives_valid_output(llm, prompts):
    letters = _run(llm, prompts[:4], _params(StructuredOutputsParams(regex="[a-c]{2,6}"), max_tokens=8,
                                             threshold=0.5))
    for c in letters:
        assert re.fullmatch("[a-c]{2,6}", c.text) and c.finish_reason == "stop", (c.text, c.finish_reason)
    [after] = _run(llm, prompts[:1], _params(threshold=0.9))  # the engine serves on
    assert after.token_ids


def test_mixed_concurrent_constrained_and_free_requests(llm, prompts):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    choices = ["1234", "98765"]
    # Fresh params per request: vLLM rewrites the StructuredOutputsParams it is given (a choice becomes a grammar).
    kinds = {"free": lambda: None, "digits": lambda: StructuredOutputsParams(regex="[0-9]+"),
             "choice": lambda: StructuredOutputsParams(choice=choices),
             "json": lambda: StructuredOutputsParams(json=schema)}
    names = list(kinds)
    requests = [(names[i % 4], prompts[i % len(prompts)], RULES[list(RULES)[i % 3]]) for i in range(16)]
    alone = [_run(llm, [p], _params(kinds[k](), max_tokens=48 if k == "json" else MAX_TOKENS, **r))[0].token_ids
             for k, p, r in requests]
    outs = _run(llm, [p for _, p, _ in requests],
                [_params(kinds[k](), max_tokens=48 if k == "json" else MAX_TOKENS, **r) for k, _, r in requests])
    for i, ((kind, _, _), out) in enumerate(zip(requests, outs)):
        # Each request decodes as it does alone (past its answer, where the JSON integer never ends, the
        # model is off its training data and near ties let fp32 batch composition flip a token).
        if kind != "json":
            assert out.token_ids == alone[i], (kind, out.text)
        if kind == "free":
            continue
        if kind == "digits":
            assert re.fullmatch("[0-9]+", out.text)
        elif kind == "choice":
            assert out.text in choices
        elif out.finish_reason == "stop":
            assert isinstance(json.loads(out.text)["n"], int)
        else:  # the digits model writes an integer that never ends
            assert out.finish_reason == "length" and re.fullmatch(r'\{"n":-?[0-9]*', out.text), out.text


def test_prefix_cache_serves_a_constrained_repeat(llm, prompts):
    long_prompt = prompts[0] * 12  # several KV pages
    first = _run(llm, [long_prompt], _params(DIGITS, threshold=0.9))[0]
    again = llm.generate([{"prompt_token_ids": long_prompt}], _params(DIGITS, threshold=0.9), use_tqdm=False)[0]
    assert again.outputs[0].token_ids == first.token_ids
    assert again.num_cached_tokens >= 128


@pytest.mark.parametrize("extra,param", [({"cfg_scale": 1.0}, "cfg_scale"), ({"ignore_eos": True}, "ignore_eos")])
def test_combinations_not_enforced_are_refused(llm, prompts, extra, param):
    from vllm.exceptions import VLLMValidationError

    xargs = {k: v for k, v in extra.items() if k != "ignore_eos"}
    params = SamplingParams(max_tokens=8, structured_outputs=DIGITS, ignore_eos=extra.get("ignore_eos", False),
                            extra_args=xargs)
    with pytest.raises(VLLMValidationError, match=param) as err:
        llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)
    assert err.value.parameter == param
