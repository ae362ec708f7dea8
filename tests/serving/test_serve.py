"""``vllm serve`` with the plugin: real server processes, the OpenAI client and raw HTTP.

One server per family (the plugin loads by entry point; no plugin flags): BD3LM on the tiny random
checkpoint, SDLM on the tiny model trained on letter patterns (its text is readable).
"""

from __future__ import annotations

import concurrent.futures
import random
import re
import time

import pytest
import requests

from tests.conftest import random_prompt
from tests.reference import load_reference_model
from tests.reference.bd3lm_reference import generate_bd3lm
from tests.serving.server import kv_cache_usage

MASK_TEXTS = ("<|mask|>", "<text_mask>")


def completion(base: str, model: str, **body) -> requests.Response:
    return requests.post(f"{base}/v1/completions", json={"model": model, **body}, timeout=300)


# --------------------------------------------------------------------------------------------------------
# BD3LM
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bd3lm_ref(bd3lm_ckpt, reference_threads):
    return load_reference_model(bd3lm_ckpt)


BD3LM_XARGS = {"steps": 16, "block_size": 16, "remasking": "low_confidence"}


def test_bd3lm_completion_is_the_cards_output(bd3lm_client, bd3lm_ckpt, bd3lm_ref):
    prompt = random_prompt(random.Random(1), 21)
    resp = bd3lm_client.completions.create(
        model=str(bd3lm_ckpt), prompt=prompt, max_tokens=32, temperature=0.0,
        extra_body={"vllm_xargs": BD3LM_XARGS, "return_token_ids": True},
    )
    choice = resp.choices[0]
    expected = generate_bd3lm(bd3lm_ref, prompt, max_new_tokens=32, steps=16, block_size=16, eos_ids=(151645,))
    stop = next((i for i, t in enumerate(expected) if t in (151643, 151645)), None)
    expected = expected if stop is None else expected[: stop + 1]
    assert list(choice.token_ids) == expected
    assert resp.usage.prompt_tokens == 21 and resp.usage.completion_tokens == len(expected)


def test_bd3lm_classifier_free_guidance_is_the_cards(bd3lm_client, bd3lm_ckpt, bd3lm_ref):
    prompt = random_prompt(random.Random(4), 45)
    resp = bd3lm_client.completions.create(
        model=str(bd3lm_ckpt), prompt=prompt, max_tokens=24, temperature=0.0,
        extra_body={"vllm_xargs": {"steps": 12, "cfg_scale": 1.5}, "return_token_ids": True},
    )
    expected = generate_bd3lm(bd3lm_ref, prompt, max_new_tokens=24, steps=12, block_size=32, cfg_scale=1.5,
                              eos_ids=(151645,))
    stop = next((i for i, t in enumerate(expected) if t in (151643, 151645)), None)
    assert list(resp.choices[0].token_ids) == (expected if stop is None else expected[: stop + 1])


def test_bd3lm_chat_uses_the_tokenizers_template(bd3lm_client, bd3lm_ckpt):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "You are a helpful AI assistant."},
                {"role": "user", "content": "Write a BFS in Python."}]
    resp = bd3lm_client.chat.completions.create(
        model=str(bd3lm_ckpt), messages=messages, max_tokens=16, temperature=0.0,
        extra_body={"vllm_xargs": BD3LM_XARGS},
    )
    tokenizer = AutoTokenizer.from_pretrained(bd3lm_ckpt)
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert resp.usage.prompt_tokens == len(templated)
    assert resp.choices[0].message.role == "assistant"
    assert not any(m in resp.choices[0].message.content for m in MASK_TEXTS)


def test_bd3lm_streams_whole_blocks_that_add_up_to_the_text(bd3lm_client, bd3lm_ckpt):
    prompt = random_prompt(random.Random(2), 16)  # aligned: every block is 16 new tokens
    kw = dict(model=str(bd3lm_ckpt), prompt=prompt, max_tokens=48, temperature=0.0,
              extra_body={"vllm_xargs": BD3LM_XARGS, "ignore_eos": True})
    full = bd3lm_client.completions.create(**kw).choices[0].text
    deltas = [c.choices[0].text for c in bd3lm_client.completions.create(stream=True, **kw) if c.choices]
    assert "".join(deltas) == full
    assert 2 <= len([d for d in deltas if d]) <= 3  # one delta per committed block of 16 tokens
    assert not any(m in d for d in deltas for m in MASK_TEXTS)


def test_bd3lm_parallel_clients_get_their_single_request_outputs(bd3lm_client, bd3lm_ckpt):
    rng = random.Random(3)
    prompts = [random_prompt(rng, rng.randint(5, 40)) for _ in range(8)]

    def ask(prompt):
        return bd3lm_client.completions.create(
            model=str(bd3lm_ckpt), prompt=prompt, max_tokens=24, temperature=0.0,
            extra_body={"vllm_xargs": BD3LM_XARGS, "return_token_ids": True},
        ).choices[0].token_ids

    alone = [ask(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone


def test_bd3lm_n_and_seed(bd3lm_client, bd3lm_ckpt):
    kw = dict(model=str(bd3lm_ckpt), prompt="def bfs(graph):", max_tokens=16, temperature=1.0, seed=5, n=2,
              extra_body={"vllm_xargs": BD3LM_XARGS, "return_token_ids": True})
    a = bd3lm_client.completions.create(**kw)
    b = bd3lm_client.completions.create(**kw)
    assert len(a.choices) == 2
    assert [c.token_ids for c in a.choices] == [c.token_ids for c in b.choices]


@pytest.mark.parametrize(
    "body,param",
    [
        ({"vllm_xargs": {"steps": 0}}, "steps"),
        ({"vllm_xargs": {"steps": "many"}}, "steps"),
        ({"vllm_xargs": {"remasking": "entropy"}}, "remasking"),
        ({"vllm_xargs": {"block_size": 48}}, "block_size"),  # must divide the 128-token KV page
        ({"vllm_xargs": {"alg": "prob_conf"}}, "alg"),  # an SDLM option
        ({"vllm_xargs": {"cfg_scale": 1.0, "block_size": 16}}, "cfg_scale"),
        ({"vllm_xargs": {"cfg_scale": 1.0}, "max_tokens": 1000}, "max_tokens"),  # no room for guidance
        ({"top_p": 0.5}, "top_p"),
        ({"logprobs": 2}, "logprobs"),
    ],
)
def test_bd3lm_bad_options_answer_400_naming_the_parameter(bd3lm_server, bd3lm_ckpt, body, param):
    resp = completion(bd3lm_server, str(bd3lm_ckpt), prompt="hi", **{"max_tokens": 8, **body})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and param in error["message"]


def test_bd3lm_prompt_longer_than_the_context_answers_400(bd3lm_server, bd3lm_ckpt):
    resp = completion(bd3lm_server, str(bd3lm_ckpt), prompt=list(range(100, 1200)), max_tokens=8)
    assert resp.status_code == 400, resp.text


def test_bd3lm_server_keeps_serving_and_frees_all_kv(bd3lm_server, bd3lm_ckpt):
    resp = completion(bd3lm_server, str(bd3lm_ckpt), prompt="hello", max_tokens=8, vllm_xargs=BD3LM_XARGS)
    assert resp.status_code == 200 and resp.json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert kv_cache_usage(bd3lm_server) == 0.0


# --------------------------------------------------------------------------------------------------------
# SDLM
# --------------------------------------------------------------------------------------------------------
def test_sdlm_completion_reports_tokens_per_forward(sdlm_server, letters_ckpt):
    resp = completion(sdlm_server, str(letters_ckpt), prompt=" a c e g i k", max_tokens=24, temperature=0,
                      vllm_xargs={"alg": "prob_conf", "threshold": 0.9})
    body = resp.json()
    assert resp.status_code == 200
    assert body["choices"][0]["text"].startswith(" m o q s u")
    spec = body["metrics"]["speculative_decoding"]
    assert spec["mean_acceptance_length"] > 1.5
    histogram = spec["acceptance_histogram"]
    assert sum((j + 1) * n for j, n in enumerate(histogram)) >= body["usage"]["completion_tokens"]


def test_sdlm_streams_accepted_prefixes_that_add_up_to_the_text(sdlm_client, letters_ckpt):
    kw = dict(model=str(letters_ckpt), prompt=" b d f h j", max_tokens=32, temperature=0.0,
              extra_body={"vllm_xargs": {"threshold": 0.9}})
    full = sdlm_client.completions.create(**kw)
    deltas = [c.choices[0].text for c in sdlm_client.completions.create(stream=True, **kw) if c.choices]
    assert "".join(deltas) == full.choices[0].text
    windows = sum(full.metrics["speculative_decoding"]["acceptance_histogram"])  # vLLM's extra response field
    assert len([d for d in deltas if d]) == windows < 32  # one delta per forward, several tokens each


def test_sdlm_n_seed_and_logprobs(sdlm_client, letters_ckpt):
    kw = dict(model=str(letters_ckpt), prompt=" a c e", max_tokens=8, temperature=1.0, seed=3, n=2, logprobs=2,
              extra_body={"vllm_xargs": {"threshold": 0.5}, "return_token_ids": True})
    a = sdlm_client.completions.create(**kw)
    b = sdlm_client.completions.create(**kw)
    assert len(a.choices) == 2 and [c.token_ids for c in a.choices] == [c.token_ids for c in b.choices]
    for choice in a.choices:
        logprobs = choice.logprobs
        assert len(logprobs.token_logprobs) == len(choice.token_ids) == 8
        assert all(lp <= 0 for lp in logprobs.token_logprobs)
        assert all(2 <= len(top) <= 3 for top in logprobs.top_logprobs)


def test_sdlm_chat_and_stop_string(sdlm_client, letters_ckpt):
    resp = sdlm_client.completions.create(model=str(letters_ckpt), prompt=" a b c d e f g h", max_tokens=30,
                                          temperature=0.0, stop=[" p"], extra_body={"vllm_xargs": {"threshold": 0.5}})
    assert resp.choices[0].text == " i j k l m n o" and resp.choices[0].finish_reason == "stop"
    chat = sdlm_client.chat.completions.create(
        model=str(letters_ckpt), messages=[{"role": "user", "content": "count"}], max_tokens=8, temperature=0.0,
        extra_body={"vllm_xargs": {"alg": "entropy_conf", "threshold": 0.95}},
    )
    assert chat.usage.completion_tokens == 8


@pytest.mark.parametrize(
    "xargs,param",
    [
        ({"alg": "bogus"}, "alg"),
        ({"threshold": -1}, "threshold"),
        ({"threshold": "high"}, "threshold"),
        ({"steps": 4}, "steps"),  # a BD3LM option
    ],
)
def test_sdlm_bad_options_answer_400_and_the_server_keeps_serving(sdlm_server, letters_ckpt, xargs, param):
    resp = completion(sdlm_server, str(letters_ckpt), prompt=" a b", max_tokens=4, vllm_xargs=xargs)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
    ok = completion(sdlm_server, str(letters_ckpt), prompt=" a b", max_tokens=4)
    assert ok.status_code == 200


def test_sdlm_prometheus_counts_windows_and_kv_is_freed(sdlm_server, letters_ckpt):
    def counters():
        text = requests.get(f"{sdlm_server}/metrics", timeout=10).text
        return [float(re.search(rf"^vllm:spec_decode_num_{name}_total\{{[^}}]*\}} (\S+)$", text, re.M).group(1))
                for name in ("drafts", "accepted_tokens")]

    before = counters()
    body = completion(sdlm_server, str(letters_ckpt), prompt=" c f i l", max_tokens=20, temperature=0,
                      vllm_xargs={"alg": "self_speculative"}).json()
    after = counters()
    histogram = body["metrics"]["speculative_decoding"]["acceptance_histogram"]
    assert after[0] - before[0] == sum(histogram)
    assert after[1] - before[1] == sum(j * n for j, n in enumerate(histogram))
    assert kv_cache_usage(sdlm_server) == 0.0


def test_bd3lm_parallel_decoding_reports_tokens_per_forward_and_streams_by_block(bd3lm_server, bd3lm_ckpt):
    """threshold over HTTP: the response's metrics and Prometheus count denoising forwards, the stream
    is one chunk per finished block, the trace shows how many positions each step committed."""
    from tests.serving.server import stream_choices

    def counters():
        text = requests.get(f"{bd3lm_server}/metrics", timeout=10).text
        return [float(re.search(rf"^vllm:spec_decode_num_{name}_total\{{[^}}]*\}} (\S+)$", text, re.M).group(1))
                for name in ("drafts", "accepted_tokens")]

    prompt = random_prompt(random.Random(6), 16)  # aligned: blocks of 16 new tokens
    xargs = {"steps": 16, "block_size": 16, "threshold": 0.004}  # random weights: low confidences
    before = counters()
    body = completion(bd3lm_server, str(bd3lm_ckpt), prompt=prompt, max_tokens=48, temperature=0.0,
                      ignore_eos=True, vllm_xargs=xargs).json()
    spec = body["metrics"]["speculative_decoding"]
    forwards = sum(spec["acceptance_histogram"])
    assert spec["mean_acceptance_length"] > 1 and forwards < 16 * 3  # fewer forwards than the card's 48
    expected = [forwards, sum(j * n for j, n in enumerate(spec["acceptance_histogram"]))]
    # The front end records a step's statistics after handing its outputs to the request, so the last
    # step's counts may reach Prometheus just after the response.
    deadline = time.time() + 10
    while (after := counters()) != [b + e for b, e in zip(before, expected)] and time.time() < deadline:
        time.sleep(0.2)
    assert [a - b for a, b in zip(after, before)] == expected
    chunks = stream_choices(bd3lm_server, dict(model=str(bd3lm_ckpt), prompt=prompt, max_tokens=48,
                                               temperature=0.0, ignore_eos=True, vllm_xargs=dict(xargs, trace=1)))
    texts = [c["text"] for c in chunks if c.get("text")]
    assert "".join(texts) == body["choices"][0]["text"] and len(texts) == 3
    frames = [c["blockdiff_trace"][0] for c in chunks if "blockdiff_trace" in c]
    assert len(frames) == forwards and sum(f["committed"] for f in frames) >= 48
