"""SDLM structured outputs through vLLM's own structured-output manager (xgrammar), on the letters model:
window row 0 under the grammar's bitmask, the accepted run cut at the first token the grammar rejects."""

from __future__ import annotations

import json
import random
import re

import pytest
from vllm import SamplingParams
from vllm.sampling_params import StructuredOutputsParams

from tests.conftest import inproc_engine

LETTERS = re.compile(r"( [a-z])+")


@pytest.fixture(scope="module")
def letters(tmp_path_factory):
    from vllm_blockdiff.testing.trained_sdlm import build_trained_sdlm_checkpoint

    return build_trained_sdlm_checkpoint(tmp_path_factory.mktemp("letters_structured"), D=4)


@pytest.fixture(scope="module")
def llm(letters):
    yield from inproc_engine(letters)


def params(structured=None, max_tokens=24, **xargs):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, structured_outputs=structured,
                          extra_args={"threshold": 0.5, **xargs})


def run(llm, prompts, ps):
    return [o.outputs[0] for o in llm.generate(prompts, ps, use_tqdm=False)]


def test_a_grammar_the_model_follows_keeps_several_tokens_per_forward(llm):
    vowels = "( [aeiou]){4,12}"
    [free, constrained] = run(llm, [" a b c d"] * 2, [params(), params(StructuredOutputsParams(regex=vowels))])
    assert LETTERS.fullmatch(free.text)
    assert re.fullmatch(vowels, constrained.text), constrained.text
    [counted] = run(llm, [" a b c d"], [params(StructuredOutputsParams(regex="( [a-z]){3,40}"))])
    assert re.fullmatch("( [a-z]){3,40}", counted.text)
    metrics = counted.spec_decode_metrics.to_dict()
    assert metrics["mean_acceptance_length"] > 1.5  # the grammar agrees with the model: runs commit


def test_choice_and_json_schema_parse(llm):
    schema = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}, "n": {"type": "integer"}},
              "required": ["a", "n"], "additionalProperties": False}
    choice, obj = run(llm, [" a c e", " b d f"], [
        params(StructuredOutputsParams(choice=[" g i k m", " x y z"])),
        params(StructuredOutputsParams(json=schema), max_tokens=40),
    ])
    assert choice.text in (" g i k m", " x y z") and choice.finish_reason == "stop"
    if obj.finish_reason == "stop":
        value = json.loads(obj.text)
        assert value["a"] in ("x", "y") and isinstance(value["n"], int)
    else:  # the model may write digits forever: still a valid prefix of the schema
        assert obj.text.startswith('{"a"') or obj.text.startswith('{ "a"')


def test_a_grammar_the_model_cannot_follow_still_gives_valid_output(llm):
    # The letters model never saw a digit: every token comes from row 0 under the bitmask.
    [digits] = run(llm, [" a b c d"], [params(StructuredOutputsParams(regex="[0-9]{5}"))])
    assert re.fullmatch("[0-9]{5}", digits.text) and digits.finish_reason == "stop"
    assert digits.spec_decode_metrics.to_dict()["mean_acceptance_length"] == 1.0


def test_sixteen_mixed_requests_share_batches_and_the_prefix_cache(llm):
    rng = random.Random(3)
    starts = [" a c e g", " b c d e f", " z y x w", " m o q s u"]
    prompts, ps, kinds = [], [], []
    for i in range(20):
        prompts.append(starts[i % 4] + (" a" if i % 3 else ""))
        kind = ["free", "regex", "choice", "free", "vowels"][i % 5]
        kinds.append(kind)
        structured = {"free": None, "regex": StructuredOutputsParams(regex="( [a-z]){2,9}"),
                      "choice": StructuredOutputsParams(choice=[" p", " q r"]),
                      "vowels": StructuredOutputsParams(regex="( [aeiou])+")}[kind]
        ps.append(params(structured, max_tokens=rng.randint(8, 20), alg=rng.choice(["prob_conf", "entropy_conf"])))
    together = run(llm, prompts, ps)
    for kind, prompt, p, out in zip(kinds, prompts, ps, together):
        if kind == "regex":
            assert re.fullmatch("( [a-z]){2,9}", out.text)
        elif kind == "choice":
            assert out.text in (" p", " q r")
        elif kind == "vowels":
            assert re.fullmatch("( [aeiou])*", out.text)
        # Deterministic: each request alone gives the same tokens.
        [alone] = run(llm, [prompt], [p])
        assert alone.token_ids == out.token_ids, (kind, prompt)


def test_self_speculative_under_a_grammar_is_refused(llm):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError) as err:
        run(llm, [" a b"], [params(StructuredOutputsParams(regex="( [a-z])+"), alg="self_speculative")])
    assert err.value.parameter == "structured_outputs"
