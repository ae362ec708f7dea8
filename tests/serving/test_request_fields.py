"""Standard request fields over HTTP against real ``vllm serve`` processes: every refused field is a 400
naming it, streamed or not (the same body), the server survives every one of them, and the vocabulary
fields are enforced."""

from __future__ import annotations

import json
import re

import pytest
import requests

from tests.serving.server import kv_cache_usage

SCHEMA = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": SCHEMA}}]

# (endpoint, extra body, the field the 400 must name, families that refuse it)
REFUSED = [
    ("completions", {"presence_penalty": 0.5}, "presence_penalty", ("bd3lm", "sdlm")),
    ("completions", {"frequency_penalty": 0.5}, "frequency_penalty", ("bd3lm", "sdlm")),
    ("completions", {"repetition_penalty": 1.3}, "repetition_penalty", ("bd3lm", "sdlm")),
    ("completions", {"min_p": 0.1}, "min_p", ("bd3lm", "sdlm")),
    ("completions", {"top_p": 0.5}, "top_p", ("bd3lm",)),
    ("completions", {"top_k": 5}, "top_k", ("bd3lm",)),
    ("completions", {"logprobs": 2}, "logprobs", ("bd3lm",)),
    ("completions", {"prompt_logprobs": 1}, "prompt_logprobs", ("bd3lm", "sdlm")),
    ("completions", {"logprob_token_ids": [5, 6]}, "logprob_token_ids", ("bd3lm", "sdlm")),
    ("completions", {"thinking_token_budget": 4}, "thinking_token_budget", ("bd3lm", "sdlm")),
    ("completions", {"structured_outputs": {"regex": "[a-z]+"}, "vllm_xargs": {"cfg_scale": 1.0}}, "cfg_scale",
     ("bd3lm",)),
    ("completions", {"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos", ("bd3lm",)),
    ("completions", {"guided_regex": "[a-z]+"}, "guided_regex", ("bd3lm", "sdlm")),
    ("chat", {"guided_json": SCHEMA}, "guided_json", ("bd3lm", "sdlm")),
    ("completions", {"use_beam_search": True, "n": 2}, "use_beam_search", ("bd3lm", "sdlm")),
    ("completions", {"kv_transfer_params": {"do_remote_prefill": False}}, "kv_transfer_params", ("bd3lm", "sdlm")),
    ("completions", {"vllm_xargs": {"steps": 0}}, "steps", ("bd3lm",)),
    ("completions", {"vllm_xargs": {"threshold": 2.5}}, "threshold", ("bd3lm",)),
    ("completions", {"vllm_xargs": {"factor": 1.0, "threshold": 0.5}}, "factor", ("bd3lm",)),
    ("completions", {"vllm_xargs": {"alg": "nope"}}, "alg", ("sdlm",)),
    ("completions", {"vllm_xargs": {"alg": "self_speculative"}, "logprobs": 1}, "logprobs", ("sdlm",)),
    ("completions", {"vllm_xargs": {"alg": "self_speculative"}, "structured_outputs": {"regex": "( [a-z])+"}},
     "structured_outputs", ("sdlm",)),
]


def post(base: str, model: str, endpoint: str, body: dict) -> requests.Response:
    payload = {"model": model, "max_tokens": 8, **body}
    if endpoint == "chat":
        payload["messages"] = [{"role": "user", "content": "count"}]
        return requests.post(f"{base}/v1/chat/completions", json=payload, timeout=300)
    payload["prompt"] = " a b c"
    return requests.post(f"{base}/v1/completions", json=payload, timeout=300)


@pytest.fixture(params=["bd3lm", "sdlm"])
def served(request):
    family = request.param
    server = request.getfixturevalue(f"{family}_server")
    ckpt = request.getfixturevalue("bd3lm_ckpt" if family == "bd3lm" else "letters_ckpt")
    return family, server, str(ckpt)


@pytest.mark.parametrize("endpoint,body,field,families", REFUSED, ids=[f"{r[2]}-{i}" for i, r in enumerate(REFUSED)])
def test_refused_fields_are_a_400_naming_them_streamed_or_not(served, endpoint, body, field, families):
    family, base, model = served
    plain = post(base, model, endpoint, body)
    streamed = post(base, model, endpoint, {**body, "stream": True})
    if family not in families:
        if "vllm_xargs" not in body:  # a standard field the other family honours (an option of one
            assert plain.status_code == 200, plain.text  # family is an unknown option to the other)
        return
    assert plain.status_code == 400, plain.text
    error = plain.json()["error"]
    assert field in error["message"] and error["param"] in (field, None), error
    # Streamed: refused before the stream starts, with the same body (unless vLLM itself refuses the
    # field together with streaming, for every model: prompt_logprobs, beam search).
    assert streamed.status_code == 400, streamed.text[:500]
    if "stream" not in streamed.json()["error"]["message"].lower():
        assert streamed.json() == plain.json()


def test_the_servers_survive_every_refused_field_and_free_all_kv(served):
    family, base, model = served
    for endpoint in ("completions", "chat"):
        ok = post(base, model, endpoint, {"temperature": 0})
        assert ok.status_code == 200, ok.text
    assert kv_cache_usage(base) == 0.0
    assert requests.get(f"{base}/health", timeout=10).status_code == 200


def _token_ids(resp) -> list[int]:
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["token_ids"]


def test_vocabulary_fields_are_enforced_over_http(served):
    family, base, model = served
    xargs = {"steps": 8, "block_size": 16} if family == "bd3lm" else {"threshold": 0.5}
    body = {"temperature": 0, "max_tokens": 24, "ignore_eos": True, "return_token_ids": True, "vllm_xargs": xargs}
    plain = _token_ids(post(base, model, "completions", body))
    allowed = sorted(set(plain[:3]) | {151645})
    limited = _token_ids(post(base, model, "completions", {**body, "allowed_token_ids": allowed}))
    assert set(limited) - {151665} <= set(allowed)  # the mask id never reaches text
    banned = _token_ids(post(base, model, "completions", {**body, "logit_bias": {str(plain[0]): -100}}))
    assert plain[0] not in banned
    # A streamed request with a bias: the chunks add up to the unstreamed text.
    text = post(base, model, "completions", {**body, "logit_bias": {str(plain[0]): -100}}).json()
    chunks = []
    with requests.post(f"{base}/v1/completions", json={"model": model, "prompt": " a b c", "stream": True,
                                                          **body, "logit_bias": {str(plain[0]): -100}},
                       stream=True, timeout=300) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                chunks.append(json.loads(line[6:])["choices"][0]["text"])
    assert "".join(chunks) == text["choices"][0]["text"]


def test_bad_words_over_http(served):
    from vllm.tokenizers.registry import get_tokenizer

    family, base, model = served
    tokenizer = get_tokenizer(model)  # vLLM's own tokenizer of the checkpoint
    xargs = {"steps": 8, "block_size": 16} if family == "bd3lm" else {"threshold": 0.5}
    body = {"temperature": 0, "max_tokens": 24, "ignore_eos": True, "return_token_ids": True, "vllm_xargs": xargs}
    plain = _token_ids(post(base, model, "completions", body))

    def one_token_word(token):  # " word" is this token, "word" one token too: vLLM bans both
        word = tokenizer.decode([token]).strip()
        ok = word and tokenizer.encode(" " + word, add_special_tokens=False) == [token]
        return word if ok and len(tokenizer.encode(word, add_special_tokens=False)) == 1 else None

    word = next(w for w in map(one_token_word, plain) if w)
    got = _token_ids(post(base, model, "completions", {**body, "bad_words": [word]}))
    from vllm import SamplingParams

    params = SamplingParams(bad_words=[word])
    params.update_from_tokenizer(tokenizer)  # the token sequences vLLM makes of the word
    assert params.bad_words_token_ids
    for ids in params.bad_words_token_ids:
        assert not any(got[i : i + len(ids)] == ids for i in range(len(got))), (ids, got)
    assert got != plain


def test_structured_outputs_over_http(served):
    """Enforced for both families (BD3LM: left-frontier commits): regexes, JSON schemas via response_format,
    tool calls; streamed too."""
    family, server, model = served
    regex = "( [a-z]){3,12}"
    resp = post(server, model, "completions", {"structured_outputs": {"regex": regex}, "temperature": 0,
                                                    "max_tokens": 20})
    assert resp.status_code == 200 and re.fullmatch(regex, resp.json()["choices"][0]["text"])
    text = ""
    with requests.post(f"{server}/v1/completions", json={
            "model": model, "prompt": " a b c", "max_tokens": 20, "stream": True, "temperature": 0,
            "structured_outputs": {"regex": regex}}, stream=True, timeout=300) as streamed:
        assert streamed.status_code == 200
        for line in streamed.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                text += json.loads(line[6:])["choices"][0]["text"]
    assert text == resp.json()["choices"][0]["text"]
    schema = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}}, "required": ["a"],
              "additionalProperties": False}
    chat = post(server, model, "chat", {"max_tokens": 30, "temperature": 0, "response_format": {
        "type": "json_schema", "json_schema": {"name": "pick", "schema": schema}}})
    assert chat.status_code == 200 and json.loads(chat.json()["choices"][0]["message"]["content"])["a"] in "xy"
    # A strict tool: vLLM's hermes structural tag then enforces the parameters' schema too.
    strict = [{"type": "function", "function": {"name": "pick", "parameters": schema, "strict": True}}]
    # Neither model knows JSON: under the grammar it is spelt out a token at a time.
    named = {"type": "function", "function": {"name": "pick"}}
    for tool_choice in (named, "required"):
        tools = post(server, model, "chat", {"max_tokens": 120, "temperature": 0, "tools": strict,
                                             "tool_choice": tool_choice, "parallel_tool_calls": False})
        assert tools.status_code == 200, tools.text
        choice = tools.json()["choices"][0]
        if family == "bd3lm" and not choice["message"].get("tool_calls"):
            # Random weights: inside the arguments vLLM's hermes structural tag allows free whitespace
            # (disable_any_whitespace does not reach it), which this model writes until max_tokens.
            assert choice["finish_reason"] == "length"
            assert re.fullmatch(r'<tool_call>\{"name": "pick", "arguments": \{\s*', choice["message"]["content"])
            continue
        call = choice["message"]["tool_calls"][0]["function"]
        assert call["name"] == "pick" and json.loads(call["arguments"])["a"] in ("x", "y")
