"""The request-field table (``vllm_blockdiff/request_fields.py``) against vLLM's own classes, and the
refusals it drives (pure: no engine; the HTTP side is ``tests/serving/test_request_fields.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from vllm import SamplingParams

from vllm_blockdiff.options import ModelDefaults, OptionError, validate_request
from vllm_blockdiff.request_fields import INTERNAL, OPENAI_FIELDS, REFUSED, SAMPLING_FIELDS, render_markdown

DEFAULTS = {
    "bd3lm": ModelDefaults("bd3lm", 151665, 32, 128, 1024),
    "sdlm": ModelDefaults("sdlm", 151665, 4, 32, 1024),
}

# A value that turns each refusable field on.
EXAMPLES = {
    "presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.2, "top_p": 0.5, "top_k": 5,
    "min_p": 0.1, "logprobs": 2, "prompt_logprobs": 1, "prompt_logprob_token_ids": [[1, 2]],
    "prompt_logprob_start": 1, "logprob_token_ids": [5, 6], "thinking_token_budget": 8,
    "trace_decode_token_ids": [1, 2, 3],
}


def test_every_sampling_params_field_is_decided():
    assert set(SamplingParams.__struct_fields__) == set(SAMPLING_FIELDS)


def test_every_openai_request_field_is_decided():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    known = set(SAMPLING_FIELDS) | set(OPENAI_FIELDS)
    for model in (CompletionRequest, ChatCompletionRequest):
        assert set(model.model_fields) <= known, sorted(set(model.model_fields) - known)


def test_docs_page_is_rendered_from_the_table():
    page = Path(__file__).resolve().parents[1] / "docs" / "request_fields.md"
    hint = "run: python -m vllm_blockdiff.request_fields > docs/request_fields.md"
    assert page.read_text() == render_markdown(), hint


@pytest.mark.parametrize("family", ["bd3lm", "sdlm"])
@pytest.mark.parametrize("name", [n for n, r in SAMPLING_FIELDS.items() if REFUSED in (r.bd3lm, r.sdlm)])
def test_refused_fields_are_refused_naming_them(family, name):
    rule = SAMPLING_FIELDS[name]
    if name == "structured_outputs":
        from vllm.sampling_params import StructuredOutputsParams

        value = StructuredOutputsParams(regex="[a-z]+")
    else:
        value = EXAMPLES[name]
    params = SamplingParams(max_tokens=8, temperature=0.5, **{name: value})
    if rule.status(family) == REFUSED:
        with pytest.raises(OptionError) as err:
            validate_request(params, DEFAULTS[family])
        assert err.value.parameter == name and name in str(err.value)
    else:
        validate_request(params, DEFAULTS[family])


def test_a_field_the_table_does_not_know_is_refused_when_set():
    import msgspec

    class NewerParams(SamplingParams):  # what a newer vLLM might add
        speculative_budget: int = 0

    assert "speculative_budget" in NewerParams.__struct_fields__
    validate_request(NewerParams(max_tokens=8), DEFAULTS["bd3lm"])
    with pytest.raises(OptionError) as err:
        validate_request(msgspec.structs.replace(NewerParams(max_tokens=8), speculative_budget=3), DEFAULTS["bd3lm"])
    assert err.value.parameter == "speculative_budget"


def test_internal_fields_are_never_refused():
    for name, rule in SAMPLING_FIELDS.items():
        assert (rule.bd3lm == INTERNAL) == (rule.sdlm == INTERNAL), name


@pytest.mark.parametrize("family", ["bd3lm", "sdlm"])
def test_vllm_extra_args_fields_are_named_in_the_refusal(family):
    with pytest.raises(OptionError) as err:
        validate_request(SamplingParams(max_tokens=8, extra_args={"kv_transfer_params": {"x": 1}}),
                         DEFAULTS[family])
    assert err.value.parameter == "kv_transfer_params" and "KV connector" in str(err.value)
