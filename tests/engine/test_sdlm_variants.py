"""SDLM engine variants, one in-process engine per class: D=8 with prefix caching off and chunked
prefill, D=8 self-speculative, a causal-window checkpoint and a tied-embedding checkpoint."""

from __future__ import annotations

import random

import pytest

from tests.conftest import inproc_engine, random_prompt
from tests.engine.sdlm_cases import SDLMCase, accept_histogram, assert_matches_reference, run
from tests.reference import load_reference_model


class EngineClass:
    """One in-process engine and the reference model for the checkpoint fixture named ``CKPT``."""

    CKPT: str
    ENGINE: dict = {}

    @pytest.fixture(scope="class")
    def llm(self, request):
        yield from inproc_engine(request.getfixturevalue(self.CKPT), **self.ENGINE)

    @pytest.fixture(scope="class")
    def ref_model(self, request, reference_threads):
        return load_reference_model(request.getfixturevalue(self.CKPT))


class TestWindowOf8NoPrefixCacheChunkedPrefill(EngineClass):
    D = 8
    CKPT = "sdlm8_ckpt"
    # 64 tokens per step: prompts longer than that are prefilled in chunks.
    ENGINE = {"enable_prefix_caching": False, "max_num_batched_tokens": 64}

    @pytest.mark.parametrize("alg", ["prob_conf", "entropy_conf"])
    @pytest.mark.parametrize("threshold", [0.0, 0.6, 0.97, 2.0])
    def test_greedy_matches_reference(self, llm, ref_model, alg, threshold):
        case = SDLMCase(max_tokens=29, alg=alg, threshold=threshold)
        rng = random.Random(f"{alg}-{threshold}-8")
        prompts = [random_prompt(rng, n) for n in (2, 100, 150)]  # two of them chunked
        lengths_seen = []
        for prompt, completion in zip(prompts, run(llm, prompts, case.params())):
            expected, accept_lengths = case.reference(ref_model, prompt, self.D)
            assert_matches_reference(completion, expected, case.max_tokens)
            assert completion.spec_decode_metrics.histogram == accept_histogram(accept_lengths, self.D)
            lengths_seen += accept_lengths
        if threshold == 0.0:
            assert set(lengths_seen) == {self.D}

    def test_self_speculative_falls_back_when_a_packed_step_exceeds_the_token_budget(self, llm, ref_model):
        """Eight verify windows with their recomputed tails need more than 64 tokens: one token per
        forward then, never a request waiting forever for a budget it cannot get."""
        case = SDLMCase(max_tokens=30, alg="self_speculative")
        rng = random.Random(88)
        prompts = [random_prompt(rng, n) for n in (5, 40)]
        for prompt, completion in zip(prompts, run(llm, prompts, case.params())):
            assert_matches_reference(completion, case.reference(ref_model, prompt, self.D)[0], case.max_tokens)
            assert completion.spec_decode_metrics.histogram[0] == sum(completion.spec_decode_metrics.histogram)

    def test_concurrent_requests_held_back_by_the_token_budget_stay_exact(self, llm, ref_model):
        """16 requests of up to 2*D tokens per step against a 64-token budget: some wait each step."""
        rng = random.Random(8)
        cases = [SDLMCase(20, "prob_conf" if i % 2 else "entropy_conf", (0.0, 0.6, 0.95)[i % 3]) for i in range(16)]
        prompts = [random_prompt(rng, rng.randint(1, 80)) for _ in cases]
        for case, prompt, completion in zip(cases, prompts, run(llm, prompts, [c.params() for c in cases])):
            assert_matches_reference(completion, case.reference(ref_model, prompt, self.D)[0], case.max_tokens)


class TestSelfSpeculativeWindowOf8(EngineClass):
    D = 8
    CKPT = "sdlm8_ckpt"

    def test_packs_eight_verify_windows(self, llm, ref_model):
        case = SDLMCase(max_tokens=30, alg="self_speculative")
        rng = random.Random(88)
        prompts = [random_prompt(rng, n) for n in (5, 40)]
        for prompt, completion in zip(prompts, run(llm, prompts, case.params())):
            expected, verify_lengths = case.reference(ref_model, prompt, self.D)
            assert_matches_reference(completion, expected, case.max_tokens)
            assert completion.spec_decode_metrics.histogram == accept_histogram(verify_lengths, self.D)


class TestCausalWindow(EngineClass):
    """``casual_attn: true`` (older spelling): the window attends causally within itself."""

    D = 4
    CKPT = "sdlm4_causal_window_ckpt"

    @pytest.mark.parametrize("alg", ["prob_conf", "self_speculative"])
    def test_matches_the_causal_window_reference(self, llm, ref_model, alg):
        case = SDLMCase(max_tokens=20, alg=alg, threshold=0.3)
        prompts = [random_prompt(random.Random(alg), n) for n in (4, 37)]
        for prompt, completion in zip(prompts, run(llm, prompts, case.params())):
            expected, _ = case.reference(ref_model, prompt, self.D, causal_window=True)
            assert_matches_reference(completion, expected, case.max_tokens)
        bidirectional, _ = case.reference(ref_model, prompts[1], self.D)
        assert bidirectional != expected  # the option matters for this checkpoint


class TestTiedEmbeddings(EngineClass):
    D = 4
    CKPT = "sdlm4_tied_ckpt"

    @pytest.mark.parametrize("threshold", [0.0, 2.0])
    def test_greedy_matches_reference(self, llm, ref_model, threshold):
        case = SDLMCase(max_tokens=18, threshold=threshold)
        prompts = [random_prompt(random.Random(threshold), n) for n in (5, 50)]
        for prompt, completion in zip(prompts, run(llm, prompts, case.params())):
            assert_matches_reference(completion, case.reference(ref_model, prompt, self.D)[0], case.max_tokens)
