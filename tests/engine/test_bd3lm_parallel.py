"""BD3LM parallel decoding (``threshold``, ``factor``) through the real engine, token-exact against the
reference decoder using the same rule, with the forwards each request took."""

from __future__ import annotations

import random

import pytest
from vllm import SamplingParams

from tests.conftest import EOS_ID, focus_head, inproc_engine, random_prompt, truncate_at_stop
from tests.reference import load_reference_model
from tests.reference.bd3lm_reference import generate_bd3lm


@pytest.fixture(scope="module")
def focused_ckpt(tmp_path_factory):
    """A random BD3LM whose head is focused on a few tokens: confidences spread over (0, 1)."""
    from vllm_blockdiff.testing.tiny_checkpoints import build_bd3lm_checkpoint

    ckpt = build_bd3lm_checkpoint(tmp_path_factory.mktemp("bd3lm_focused"), seed=11)
    focus_head(ckpt, 6, 9.0, seed=11, include=(EOS_ID,))
    return ckpt


@pytest.fixture(scope="class")
def llm(focused_ckpt):
    """The default engine (prefix caching on); one in-process engine at a time, so class-scoped."""
    yield from inproc_engine(focused_ckpt)


@pytest.fixture(scope="module")
def ref_model(focused_ckpt, reference_threads):
    return load_reference_model(focused_ckpt)


def params(max_tokens, *, steps=None, block_size=None, temperature=0.0, seed=None, **extra):
    extra = {k: v for k, v in extra.items() if v is not None}
    if steps is not None:
        extra["steps"] = steps
    if block_size is not None:
        extra["block_size"] = block_size
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, extra_args=extra)


def reference(model, prompt, max_tokens, *, steps=None, block_size=None, temperature=0.0, seed=None,
              forwards=None, **extra):
    out = generate_bd3lm(model, prompt, max_new_tokens=max_tokens, steps=steps or max_tokens,
                         block_size=block_size or 32, temperature=temperature, seed=seed, eos_ids=(EOS_ID,),
                         forwards=forwards, **extra)
    return truncate_at_stop(out)


CASES = {
    "threshold_0.9": dict(threshold=0.9),
    "threshold_0.5": dict(threshold=0.5),
    "threshold_0.2_unaligned_block16": dict(threshold=0.2, block_size=16),
    "threshold_0.7_few_steps": dict(threshold=0.7, steps=8),
    "threshold_sampled": dict(threshold=0.6, temperature=0.8, seed=5),
    "factor_1": dict(factor=1.0),
    "factor_3_block8": dict(factor=3.0, block_size=8),
    "factor_sampled": dict(factor=2.0, temperature=1.0, seed=9),
    "threshold_cfg": dict(threshold=0.5, cfg_scale=1.0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_parallel_rules_match_the_reference(llm, ref_model, name):
    case = CASES[name]
    prompt = random_prompt(random.Random(name), 7 + len(name))
    forwards = []
    expected = reference(ref_model, prompt, 48, forwards=forwards, **case)
    [out] = llm.generate([{"prompt_token_ids": prompt}], params(48, **case), use_tqdm=False)
    assert list(out.outputs[0].token_ids) == expected
    metrics = out.outputs[0].spec_decode_metrics
    assert sum(metrics.histogram) == forwards[0]  # one "draft" per denoising forward
    card_forwards = []
    reference(ref_model, prompt, 48, forwards=card_forwards, steps=case.get("steps"),
              block_size=case.get("block_size"))
    assert forwards[0] <= card_forwards[0]  # steps stays the worst case


def test_low_thresholds_commit_several_tokens_per_forward(llm, ref_model):
    prompt = random_prompt(random.Random("many"), 32)  # aligned: whole blocks of 32
    forwards = []
    expected = reference(ref_model, prompt, 64, threshold=0.05, forwards=forwards)
    [out] = llm.generate([{"prompt_token_ids": prompt}], params(64, threshold=0.05), use_tqdm=False)
    assert list(out.outputs[0].token_ids) == expected
    metrics = out.outputs[0].spec_decode_metrics.to_dict()
    assert metrics["mean_acceptance_length"] > 2  # tokens per forward
    assert sum(metrics["acceptance_histogram"]) == forwards[0] < 64


def test_concurrent_mixed_rules_each_match_the_reference(llm, ref_model):
    rng = random.Random(77)
    names = list(CASES) + ["card"] * 3
    prompts = [random_prompt(rng, rng.randint(3, 70)) for _ in names]
    cases = [CASES.get(n, {}) for n in names]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], [params(40, **c) for c in cases],
                        use_tqdm=False)
    for case, prompt, out in zip(cases, prompts, outs):
        forwards = []
        assert list(out.outputs[0].token_ids) == reference(ref_model, prompt, 40, forwards=forwards, **case), case
        # Canvases of different lengths share the step: each ends the moment its own masks are gone.
        assert sum(out.outputs[0].spec_decode_metrics.histogram) == forwards[0], case


def test_shared_prefix_reuses_the_cache_under_threshold(llm, ref_model):
    rng = random.Random(5)
    prefix = random_prompt(rng, 140)
    prompts = [prefix + random_prompt(rng, n) for n in (0, 9, 30)]
    first = llm.generate([{"prompt_token_ids": prompts[0]}], params(40, threshold=0.5), use_tqdm=False)
    rest = llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], params(40, threshold=0.5), use_tqdm=False)
    for prompt, out in zip(prompts, [*first, *rest]):
        assert list(out.outputs[0].token_ids) == reference(ref_model, prompt, 40, threshold=0.5)
    assert all(o.num_cached_tokens >= 128 for o in rest)


def test_n_and_seed_under_factor(llm):
    # A hot temperature: the focused head is so sure that at 1.0 the Gumbel noise rarely flips a token.
    p = SamplingParams(max_tokens=48, temperature=2.0, seed=3, n=3, extra_args={"factor": 2.0})
    a = llm.generate([{"prompt_token_ids": [5, 6, 7]}], p, use_tqdm=False)[0]
    b = llm.generate([{"prompt_token_ids": [5, 6, 7]}], p, use_tqdm=False)[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1


@pytest.fixture(scope="class")
def chunked_llm(focused_ckpt):
    """Prefill in chunks of 64 tokens (``max_num_batched_tokens``), prefix caching off."""
    yield from inproc_engine(focused_ckpt, max_num_batched_tokens=64, enable_prefix_caching=False,
                             enable_chunked_prefill=True, max_num_seqs=4)


class TestChunkedPrefill:
    def test_chunked_prefill_under_threshold(self, chunked_llm, ref_model):
        _chunked(chunked_llm, ref_model)


def _chunked(chunked_llm, ref_model):
    rng = random.Random(8)
    prompts = [random_prompt(rng, n) for n in (150, 47, 201)]
    outs = chunked_llm.generate([{"prompt_token_ids": p} for p in prompts], params(30, threshold=0.4),
                                use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert list(out.outputs[0].token_ids) == reference(ref_model, prompt, 30, threshold=0.4)
