"""SDLM through the real vLLM engine (in this process), token-exact against the reference decoder.

The checkpoint (D=4, prefix caching on) has a focused lm_head, so window confidences spread over
(0, 1) and accept lengths vary from 1 to 4 with the threshold.
"""

from __future__ import annotations

import random

import pytest
from vllm import SamplingParams

from tests.conftest import inproc_engine, random_prompt
from tests.engine.sdlm_cases import SDLMCase, accept_histogram, assert_matches_reference, run
from tests.reference import load_reference_model

D = 4


@pytest.fixture(scope="module")
def llm(sdlm4_ckpt):
    yield from inproc_engine(sdlm4_ckpt)


@pytest.fixture(scope="module")
def ref_model(sdlm4_ckpt, reference_threads):
    return load_reference_model(sdlm4_ckpt)


THRESHOLDS = [0.0, 0.3, 0.6, 0.9, 0.99, 2.0]


@pytest.mark.parametrize("alg", ["prob_conf", "entropy_conf"])
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_greedy_matches_reference(llm, ref_model, alg, threshold):
    case = SDLMCase(max_tokens=30, alg=alg, threshold=threshold)
    rng = random.Random(f"{alg}-{threshold}")
    prompts = [random_prompt(rng, n) for n in (1, 7, 40)]
    lengths_seen = []
    for prompt, completion in zip(prompts, run(llm, prompts, case.params())):
        expected, accept_lengths = case.reference(ref_model, prompt, D)
        assert_matches_reference(completion, expected, case.max_tokens)
        # vLLM's per-request acceptance histogram is the reference's accept-length statistics.
        assert completion.spec_decode_metrics.histogram == accept_histogram(accept_lengths, D)
        lengths_seen += accept_lengths
    if threshold == 0.0:
        assert set(lengths_seen) == {D}  # every step commits the whole window (up to the cut)
    if threshold >= 1.0:
        assert set(lengths_seen) == {1}
    if alg == "prob_conf" and threshold in (0.3, 0.9):  # the focused model commits 1..D tokens here
        assert len(set(lengths_seen)) >= 3, lengths_seen


def test_max_tokens_cuts_inside_an_accepted_run(llm, ref_model):
    case = SDLMCase(max_tokens=4 * 5 + 2, threshold=0.0)  # 6 windows of 4; the last keeps 2
    rng = random.Random(3)
    for _ in range(20):  # a prompt whose output does not stop at an eos first
        prompt = random_prompt(rng, 9)
        expected, accept_lengths = case.reference(ref_model, prompt, D)
        if len(expected) == case.max_tokens:
            break
    assert accept_lengths == [D] * 6
    [completion] = run(llm, [prompt], case.params())
    assert_matches_reference(completion, expected, case.max_tokens)


def test_eos_inside_an_accepted_run_ends_the_request_there(llm, ref_model):
    """Search prompts until the reference stops at an eos that is not the last token of its run."""
    case = SDLMCase(max_tokens=40, threshold=0.3)
    rng = random.Random(11)
    for _ in range(60):
        prompt = random_prompt(rng, rng.randint(2, 30))
        expected, accept_lengths = case.reference(ref_model, prompt, D)
        if len(expected) < case.max_tokens and sum(accept_lengths) > len(expected) + 1:
            break  # tokens after the eos were accepted in the same window and must be dropped
    else:
        pytest.fail("no prompt with an eos inside an accepted run: re-tune the focused checkpoint")
    [completion] = run(llm, [prompt], case.params())
    assert_matches_reference(completion, expected, case.max_tokens)


def test_ignore_eos_keeps_going(llm, ref_model):
    case = SDLMCase(max_tokens=40, threshold=0.3)
    rng = random.Random(11)
    prompts = [random_prompt(rng, rng.randint(2, 30)) for _ in range(12)]
    stopped = [p for p, c in zip(prompts, run(llm, prompts, case.params())) if c.finish_reason == "stop"]
    assert stopped, "the focused checkpoint should stop at an eos for some of these prompts"
    [completion] = run(llm, stopped[:1], case.params(ignore_eos=True))
    assert len(completion.token_ids) == case.max_tokens and completion.finish_reason == "length"


def test_sixteen_concurrent_requests_with_mixed_options_each_match_reference(llm, ref_model):
    """Requests with different algorithms, thresholds and samplers share every batch; each gets its
    reference output, token for token (sampled ones too: same generator stream, same race)."""
    kinds = [
        SDLMCase(24, "prob_conf", 0.0),
        SDLMCase(24, "entropy_conf", 0.5),
        SDLMCase(24, "prob_conf", 0.9),
        SDLMCase(24, "entropy_conf", 0.95),
        SDLMCase(24, "prob_conf", 2.0),
        SDLMCase(24, None, None),
        SDLMCase(24, "prob_conf", 0.6, temperature=0.8, seed=7),
        SDLMCase(24, "entropy_conf", 0.3, temperature=1.2, top_p=0.9, top_k=5, seed=8),
    ]
    rng = random.Random(2024)
    cases = [kinds[i % len(kinds)] for i in range(18)]
    prompts = [random_prompt(rng, rng.randint(1, 50)) for _ in cases]
    completions = run(llm, prompts, [c.params() for c in cases])
    for case, prompt, completion in zip(cases, prompts, completions):
        expected, accept_lengths = case.reference(ref_model, prompt, D)
        assert_matches_reference(completion, expected, case.max_tokens)
        assert completion.spec_decode_metrics.histogram == accept_histogram(accept_lengths, D)


def test_seed_fixes_sampling(llm):
    prompt = random_prompt(random.Random(5), 12)
    case = SDLMCase(20, threshold=0.5, temperature=1.0, seed=123)
    a, b = run(llm, [prompt, prompt], case.params())
    assert a.token_ids == b.token_ids
    other = run(llm, [prompt], case.params(seed=124))[0]
    assert other.token_ids != a.token_ids


def test_shared_prefix_hits_the_prefix_cache_and_stays_exact(llm, ref_model):
    rng = random.Random(99)
    prefix = random_prompt(rng, 300)
    prompts = [prefix + random_prompt(rng, n) for n in (0, 5, 40)]
    case = SDLMCase(16, threshold=0.6)
    first = run(llm, prompts[:1], case.params())
    rest = run(llm, prompts[1:], case.params())
    for prompt, completion in zip(prompts, first + rest):
        assert_matches_reference(completion, case.reference(ref_model, prompt, D)[0], case.max_tokens)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], case.params(), use_tqdm=False)
    # Whole KV pages of the shared prefix (and of earlier generations) were reused.
    assert all(o.num_cached_tokens >= 256 for o in outs)


def test_window_kv_is_never_served_from_the_prefix_cache(llm, ref_model):
    """A request that ends right after its window overwrote the last slot of a full page leaves that
    page with window KV in it. Were the page cached (vLLM hashes up to num_tokens), a longer prompt
    sharing it would read the window's KV of token 255 as context and diverge."""
    rng = random.Random(7)
    prompt = random_prompt(rng, 256)  # token 255 closes a KV page
    case = SDLMCase(1, threshold=2.0)
    run(llm, [prompt], case.params())
    extended = prompt + random_prompt(rng, 40)
    [out] = llm.generate([{"prompt_token_ids": extended}], SamplingParams(max_tokens=16, temperature=0.0),
                         use_tqdm=False)
    page = llm.llm_engine.vllm_config.cache_config.block_size
    assert out.num_cached_tokens == 256 - page  # all pages but the one closed by token 255
    assert_matches_reference(out.outputs[0], SDLMCase(16).reference(ref_model, extended, D)[0], 16)


def test_generation_stops_at_the_context_limit(llm, ref_model):
    """prompt + max_tokens beyond max_model_len (1024): length-capped; windows shrink at the very end,
    so outputs are exact up to the last D-1 positions."""
    prompt = random_prompt(random.Random(13), 1000)
    case = SDLMCase(60, threshold=0.6)
    [completion] = run(llm, [prompt], case.params())
    got = list(completion.token_ids)
    assert len(got) == 24 and completion.finish_reason == "length"
    expected, _ = case.reference(ref_model, prompt, D)
    assert got[: 24 - (D - 1)] == expected[: 24 - (D - 1)]


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"alg": "greedy"}, "alg"),
        ({"threshold": -0.1}, "threshold"),
        ({"threshold": "high"}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"steps": 8}, "steps"),
        ({"block_size": 4}, "block_size"),
    ],
)
def test_bad_options_are_rejected_and_engine_keeps_serving(llm, extra, param):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match=param) as err:
        llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=8, extra_args=extra),
                     use_tqdm=False)
    assert err.value.parameter == param
    [completion] = run(llm, [[1, 2, 3]], SamplingParams(max_tokens=8))
    assert len(completion.token_ids) >= 1


def test_self_speculative_verifies_drafts_in_packed_windows_and_equals_first_token_decoding(llm, ref_model):
    """At temperature 0 self-speculative decoding (drafts verified against the model's next prediction,
    several accepted per verify pass) equals first-token-only decoding. The engine runs SDLM's packed
    verify pass: its accept lengths per forward are the reference's, pass for pass."""
    rng = random.Random(21)
    prompts = [random_prompt(rng, n) for n in (3, 17, 33, 70)]
    spec = SDLMCase(24, "self_speculative")
    first_token = SDLMCase(24, "prob_conf", threshold=2.0)
    spec_out = run(llm, prompts, spec.params())
    first_out = run(llm, prompts, first_token.params())
    verified = []
    for prompt, a, b in zip(prompts, spec_out, first_out):
        expected, verify_lengths = spec.reference(ref_model, prompt, D)
        assert expected == first_token.reference(ref_model, prompt, D)[0]
        assert_matches_reference(a, expected, spec.max_tokens)
        assert a.token_ids == b.token_ids
        assert a.spec_decode_metrics.histogram == accept_histogram(verify_lengths, D)
        verified += verify_lengths
    assert max(verified) == D and sum(verified) / len(verified) > 1.3  # drafts do get accepted


def test_self_speculative_mixed_into_a_busy_batch(llm, ref_model):
    """More packed requests than scratch regions share the batch with other algorithms: the extra ones
    fall back to one token per forward for a step, every output stays exact."""
    from vllm_blockdiff.engine.scratch import MAX_SCRATCH_REQUESTS

    rng = random.Random(77)
    cases = [SDLMCase(20, "self_speculative") for _ in range(MAX_SCRATCH_REQUESTS + 4)]
    cases += [SDLMCase(20, "prob_conf", 0.6), SDLMCase(20, "entropy_conf", 0.9)] * 2
    prompts = [random_prompt(rng, rng.randint(1, 60)) for _ in cases]
    completions = run(llm, prompts, [c.params() for c in cases])
    fell_back = 0
    for case, prompt, completion in zip(cases, prompts, completions):
        expected, accept_lengths = case.reference(ref_model, prompt, D)
        assert_matches_reference(completion, expected, case.max_tokens)
        # A fallback step is one more 1-token forward than the reference's verify passes.
        fell_back += completion.spec_decode_metrics.histogram != accept_histogram(accept_lengths, D)
    assert fell_back > 0


def test_logprobs_are_the_window_rows_of_the_committed_tokens(llm, ref_model):
    """logprobs=k: each committed token's log-probability (and top-k) in the window row it came from,
    replayed here from the reference's windows."""
    import torch

    from tests.reference.sdlm_reference import window_logits

    case = SDLMCase(20, "prob_conf", threshold=0.3)
    prompt = random_prompt(random.Random(17), 11)
    [completion] = run(llm, [prompt], case.params(logprobs=2))
    expected, accept_lengths = case.reference(ref_model, prompt, D)
    assert_matches_reference(completion, expected, case.max_tokens)
    committed, checked = list(prompt), 0
    for n in accept_lengths:
        rows = torch.log_softmax(window_logits(ref_model, committed, D=D), dim=-1)
        for j in range(n):
            if checked == len(completion.token_ids):
                break
            token = completion.token_ids[checked]
            entry = completion.logprobs[checked]
            assert entry[token].logprob == pytest.approx(rows[j, token].item(), abs=1e-4)
            assert entry[token].rank == 1  # greedy: the chosen token is the window row's argmax
            assert set(entry) == {token} | set(rows[j].topk(2).indices.tolist())  # the sampled token + top-2
            checked += 1
        committed += expected[len(committed) - len(prompt) :][:n]
    assert checked == len(completion.token_ids) and max(accept_lengths) > 1


def test_every_step_after_the_prompt_commits(llm):
    """A window step also computes the causal KV of the tokens accepted the step before: no step in
    between that only catches up (which would double the forwards per token)."""
    from tests.conftest import scheduled_tokens

    with scheduled_tokens(llm) as steps:
        [completion] = run(llm, [random_prompt(random.Random(21), 9)], SDLMCase(40, threshold=0.3).params())
    windows = sum(completion.spec_decode_metrics.histogram)
    assert len(steps) == 1 + windows  # the prefill, then one window per forward
    assert all(D <= n <= 2 * D for n in steps[1:])  # accepted tokens (<= D) + the window
