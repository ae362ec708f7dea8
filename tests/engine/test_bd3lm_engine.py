"""BD3LM through the real vLLM engine (in this process), token-exact against the card's reference."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from vllm import SamplingParams

from tests.conftest import EOS_ID, random_prompt, scheduled_tokens, truncate_at_stop
from tests.reference import load_reference_model
from tests.reference.bd3lm_reference import generate_bd3lm


@dataclass(frozen=True)
class Case:
    prompt_len: int
    max_tokens: int
    steps: int | None = None  # None: the card's default (steps = max_tokens)
    block_size: int | None = None  # None: the checkpoint default (32)
    remasking: str = "low_confidence"
    temperature: float = 0.0
    seed: int | None = None
    cfg_scale: float = 0.0

    def params(self) -> SamplingParams:
        extra = {"remasking": self.remasking}
        if self.cfg_scale:
            extra["cfg_scale"] = self.cfg_scale
        if self.steps is not None:
            extra["steps"] = self.steps
        if self.block_size is not None:
            extra["block_size"] = self.block_size
        return SamplingParams(
            max_tokens=self.max_tokens, temperature=self.temperature, seed=self.seed, extra_args=extra
        )

    def reference(self, model, prompt: list[int]) -> list[int]:
        out = generate_bd3lm(
            model,
            prompt,
            max_new_tokens=self.max_tokens,
            steps=self.steps if self.steps is not None else self.max_tokens,
            block_size=self.block_size or 32,
            temperature=self.temperature,
            remasking=self.remasking,
            seed=self.seed,
            cfg_scale=self.cfg_scale,
            eos_ids=(EOS_ID,),
        )
        return truncate_at_stop(out)


CASES = {
    "unaligned_two_blocks": Case(5, 40),
    "aligned": Case(32, 64),
    "steps_lt_tokens_partial_last_chunk": Case(77, 70, steps=16),
    "block16": Case(40, 48, block_size=16),
    "block64_unaligned": Case(70, 30, block_size=64),
    "random_remasking_seeded": Case(13, 33, remasking="random", seed=7),
    "temperature_seeded": Case(50, 40, steps=20, temperature=0.8, seed=3),
    "one_token_prompt_small_block": Case(1, 12, steps=6, block_size=8),
    "prompt_one_short_of_block": Case(31, 20),
    "cfg_unaligned": Case(13, 40, steps=20, cfg_scale=1.0),
    "cfg_prefix_spans_pages": Case(300, 40, steps=20, cfg_scale=2.0),  # shared all-mask prefix: 2 pages
    "cfg_sampled_random_remasking": Case(45, 33, cfg_scale=0.5, temperature=0.9, remasking="random", seed=4),
}


@pytest.fixture(scope="module")
def ref_model(bd3lm_ckpt, reference_threads):
    return load_reference_model(bd3lm_ckpt)


def _run(llm, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.parametrize("name", list(CASES))
def test_single_request_matches_reference(inproc_llm, ref_model, name):
    case = CASES[name]
    prompt = random_prompt(random.Random(name), case.prompt_len)
    [got] = _run(inproc_llm, [prompt], case.params())
    assert got == case.reference(ref_model, prompt)
    assert len(got) == case.max_tokens or got[-1] in (EOS_ID, 151643)


def test_concurrent_mixed_requests_each_match_reference(inproc_llm, ref_model):
    """20 requests with mixed options share every batch; each gets what it gets alone."""
    rng = random.Random(1234)
    names = list(CASES)
    cases = [CASES[names[i % len(names)]] for i in range(20)]
    prompts = [random_prompt(rng, c.prompt_len + i) for i, c in enumerate(cases)]
    outs = inproc_llm.generate(
        [{"prompt_token_ids": p} for p in prompts], [c.params() for c in cases], use_tqdm=False
    )
    for case, prompt, out in zip(cases, prompts, outs):
        assert list(out.outputs[0].token_ids) == case.reference(ref_model, prompt), case


def test_more_guided_requests_than_scratch_regions_take_turns(inproc_llm, ref_model):
    """Each guided step needs a scratch region for its unconditional row; the extra requests wait."""
    from vllm_blockdiff.engine.scratch import MAX_SCRATCH_REQUESTS

    rng = random.Random(31)
    case = Case(0, 24, steps=8, cfg_scale=1.0)
    prompts = [random_prompt(rng, rng.randint(1, 60)) for _ in range(MAX_SCRATCH_REQUESTS + 3)]
    assert _run(inproc_llm, prompts, case.params()) == [case.reference(ref_model, p) for p in prompts]


def test_guidance_changes_the_output(ref_model):
    prompt = random_prompt(random.Random("cfg"), 13)
    assert Case(13, 40, steps=20, cfg_scale=1.0).reference(ref_model, prompt) != Case(13, 40, steps=20).reference(
        ref_model, prompt)


def test_shared_prefix_ending_mid_block_hits_cache_and_stays_exact(inproc_llm, ref_model):
    rng = random.Random(99)
    prefix = random_prompt(rng, 150)  # 150 % 32 = 22: the shared part ends inside a block
    prompts = [prefix + random_prompt(rng, n) for n in (0, 3, 10, 40)]
    case = Case(0, 40)
    first = inproc_llm.generate([{"prompt_token_ids": prompts[0]}], case.params(), use_tqdm=False)[0]
    rest = inproc_llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], case.params(), use_tqdm=False)
    for prompt, out in zip(prompts, [first, *rest]):
        assert list(out.outputs[0].token_ids) == case.reference(ref_model, prompt)
    # Whole KV pages (128 tokens = 4 diffusion blocks) of the shared prefix were reused...
    assert all(o.num_cached_tokens >= 128 for o in rest)
    # ...and never a page holding a partially filled diffusion block.
    assert all(o.num_cached_tokens % 32 == 0 for o in rest)


def test_prefix_is_never_recomputed(inproc_llm):
    """Count the tokens the scheduler runs per step: prompt once, canvas per step, block once clean."""
    with scheduled_tokens(inproc_llm) as steps_seen:
        prompt_len, max_tokens, steps, block = 200, 80, 40, 32
        prompt = random_prompt(random.Random(5), prompt_len)
        _run(inproc_llm, [prompt], Case(prompt_len, max_tokens, steps=steps).params())
    # Chunks: 200 -> 224 (24 slots), 224 -> 256 (32), 256 -> 280 (24, capped by max_tokens).
    # steps_per_block = ceil(40 / ceil(80 / 32)) = 14 forwards per chunk.
    chunks = [24, 32, 24]
    expected = [prompt_len]  # one prefill pass (no prefix-cache hit: fresh random prompt)
    for i, chunk in enumerate(chunks):
        # From the second chunk on, the finished block ([192, 224), then [224, 256), prompt tail
        # included) is re-encoded clean in the same forward as the next chunk's first step.
        expected.append(chunk + (block if i > 0 else 0))
        expected.extend([chunk] * (min(14, chunk) - 1))
    assert steps_seen == expected


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"steps": 0}, "steps"),
        ({"steps": "many"}, "steps"),
        ({"remasking": "bogus"}, "remasking"),
        ({"block_size": 48}, "block_size"),
        ({"block_size": -1}, "block_size"),
        ({"alg": "prob_conf"}, "alg"),
        ({"cfg_scale": 1.0, "block_size": 16}, "cfg_scale"),
    ],
)
def test_bad_options_are_rejected_and_engine_keeps_serving(inproc_llm, extra, param):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=param) as err:
        inproc_llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=8, extra_args=extra),
                            use_tqdm=False)
    assert err.value.parameter == param
    [out] = _run(inproc_llm, [[1, 2, 3]], SamplingParams(max_tokens=8))
    assert len(out) == 8


def test_offline_beam_search_is_refused_and_engine_keeps_serving(inproc_llm):
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import BeamSearchParams

    with pytest.raises(VLLMValidationError, match="use_beam_search") as err:
        inproc_llm.beam_search([{"prompt_token_ids": [1, 2, 3]}], BeamSearchParams(beam_width=2, max_tokens=4))
    assert err.value.parameter == "use_beam_search"
    [out] = _run(inproc_llm, [[1, 2, 3]], SamplingParams(max_tokens=8))
    assert len(out) == 8


def test_defaults_follow_the_card(inproc_llm, ref_model):
    """No extra_args: steps = max_tokens, block_size = 32, low_confidence, greedy."""
    prompt = random_prompt(random.Random(7), 21)
    [got] = _run(inproc_llm, [prompt], SamplingParams(max_tokens=24, temperature=0.0))
    assert got == Case(21, 24).reference(ref_model, prompt)


def test_generation_stops_at_the_context_limit(inproc_llm, ref_model):
    """prompt + max_tokens beyond max_model_len (1024): exact up to the limit, then length-capped."""
    prompt = random_prompt(random.Random(11), 1000)
    [out] = inproc_llm.generate([{"prompt_token_ids": prompt}], Case(1000, 60, steps=60).params(), use_tqdm=False)
    got = list(out.outputs[0].token_ids)
    assert len(got) == 24 and out.outputs[0].finish_reason == "length"
    assert got == Case(1000, 24, steps=24).reference(ref_model, prompt)


def test_pages_are_shared_only_between_requests_of_one_block_size(inproc_llm, ref_model):
    """A prompt token's KV depends on the block structure (it sees its whole block): a page computed
    under block size 16 must not serve a request with block size 32, and vice versa."""
    prompt = random_prompt(random.Random("blocks"), 150)
    sixteen, thirty_two = Case(0, 16, block_size=16), Case(0, 16)
    for case in (sixteen, thirty_two, sixteen, thirty_two):
        [out] = inproc_llm.generate([{"prompt_token_ids": prompt + [7]}], case.params(), use_tqdm=False)
        assert list(out.outputs[0].token_ids) == case.reference(ref_model, prompt + [7])
    first16 = inproc_llm.generate([{"prompt_token_ids": prompt + [8]}], Case(0, 8, block_size=16).params(),
                                  use_tqdm=False)[0]
    assert first16.num_cached_tokens == 128  # the block-16 page of the prefix is reused by block 16
