"""SDLM on a model that is actually confident: the tiny checkpoint trained on letter patterns
(``vllm_blockdiff.testing.trained_sdlm``). Windows commit several tokens per forward without
changing what greedy one-token-at-a-time decoding produces, and vLLM's metrics say so."""

from __future__ import annotations

import random

import pytest

from tests.conftest import inproc_engine
from tests.engine.sdlm_cases import SDLMCase, accept_histogram, assert_matches_reference, run
from tests.reference import load_reference_model

D = 4


@pytest.fixture(scope="module")
def letters_ckpt(tmp_path_factory):
    from vllm_blockdiff.testing.trained_sdlm import build_trained_sdlm_checkpoint

    return build_trained_sdlm_checkpoint(tmp_path_factory.mktemp("sdlm_letters"), D=D)


@pytest.fixture(scope="module")
def llm(letters_ckpt):
    yield from inproc_engine(letters_ckpt, disable_log_stats=False)  # stats on: Prometheus counters


@pytest.fixture(scope="module")
def ref_model(letters_ckpt, reference_threads):
    return load_reference_model(letters_ckpt)


@pytest.fixture(scope="module")
def prompts():
    from vllm_blockdiff.testing.trained_sdlm import letter_ids, sample_text

    ids = letter_ids()
    rng = random.Random(0)
    return [[ids[i] for i in sample_text(rng, 16)] for _ in range(8)]


def _tokens_per_forward(completions) -> float:
    windows = sum(sum(c.spec_decode_metrics.histogram) for c in completions)
    return sum(len(c.token_ids) for c in completions) / windows


def test_confident_windows_commit_several_tokens_and_change_nothing(llm, ref_model, prompts):
    one_at_a_time = run(llm, prompts, SDLMCase(48, threshold=2.0).params())
    confident = SDLMCase(48, threshold=0.9)
    windows = run(llm, prompts, confident.params())
    assert [c.token_ids for c in windows] == [c.token_ids for c in one_at_a_time]
    assert _tokens_per_forward(one_at_a_time) == 1.0
    assert _tokens_per_forward(windows) > 1.5
    for prompt, completion in zip(prompts, windows):
        expected, accept_lengths = confident.reference(ref_model, prompt, D)
        assert_matches_reference(completion, expected, confident.max_tokens)
        assert completion.spec_decode_metrics.histogram == accept_histogram(accept_lengths, D)


def test_self_speculative_verifies_several_drafts_per_forward_on_a_confident_model(llm, ref_model, prompts):
    first_token = run(llm, prompts, SDLMCase(48, threshold=2.0).params())
    spec = SDLMCase(48, "self_speculative")
    verified = run(llm, prompts, spec.params())
    assert [c.token_ids for c in verified] == [c.token_ids for c in first_token]
    assert _tokens_per_forward(verified) > 2.0
    for prompt, completion in zip(prompts[:3], verified):
        expected, verify_lengths = spec.reference(ref_model, prompt, D)
        assert_matches_reference(completion, expected, spec.max_tokens)
        assert completion.spec_decode_metrics.histogram == accept_histogram(verify_lengths, D)


def test_prometheus_counters_aggregate_the_windows(llm, prompts):
    def counters():
        values = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
        return values["vllm:spec_decode_num_drafts"], values["vllm:spec_decode_num_accepted_tokens"]

    drafts_before, accepted_before = counters()
    completions = run(llm, prompts, SDLMCase(40, threshold=0.5).params())
    drafts, accepted = counters()
    histograms = [c.spec_decode_metrics.histogram for c in completions]
    windows = sum(sum(h) for h in histograms)
    committed = sum((j + 1) * n for h in histograms for j, n in enumerate(h))  # before eos/length cuts
    assert drafts - drafts_before == windows
    assert accepted - accepted_before == committed - windows > 0
    # vLLM's mean acceptance length, 1 + accepted / drafts, is the tokens committed per forward.
    assert 1 + (accepted - accepted_before) / (drafts - drafts_before) == pytest.approx(committed / windows)


def test_stop_string_inside_an_accepted_run(llm):
    """Several letters commit per forward; the text still ends right before the stop string."""
    params = SDLMCase(30, threshold=0.5).params(stop=[" p"])
    [out] = llm.generate([" a b c d e f g h"], params, use_tqdm=False)
    completion = out.outputs[0]
    assert completion.text == " i j k l m n o" and completion.finish_reason == "stop"
    assert completion.stop_reason == " p"
    assert max(j for j, n in enumerate(completion.spec_decode_metrics.histogram) if n) > 0  # runs of > 1
