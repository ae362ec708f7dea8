"""BD3LM on a model whose answers can be checked: the tiny checkpoint trained on digit tasks
(``vllm_blockdiff.testing.trained_bd3lm``: copy and sort, every answer determined by its prompt). Through the
engine, held-out prompts decode token for token as the reference decoder decodes them under each commit rule,
they are mostly right, and the confident rules commit several tokens per forward."""

from __future__ import annotations

import pytest
from vllm import SamplingParams

from tests.conftest import inproc_engine, truncate_at_stop
from tests.reference import load_reference_model
from tests.reference.bd3lm_reference import generate_bd3lm

MAX_TOKENS = 32
RULES = {"card": {}, "threshold_0.9": {"threshold": 0.9}, "threshold_0.5": {"threshold": 0.5},
         "factor_1": {"factor": 1.0}}


@pytest.fixture(scope="module")
def llm(digits_ckpt):
    yield from inproc_engine(digits_ckpt, max_num_seqs=32)


@pytest.fixture(scope="module")
def ref_model(digits_ckpt, reference_threads):
    return load_reference_model(digits_ckpt)


@pytest.fixture(scope="module")
def prompts():
    from vllm_blockdiff.testing.trained_bd3lm import encode, heldout_prompts

    texts = heldout_prompts(16)
    return texts, [encode(t)[0] for t in texts]


def _answer_is_right(tokenizer, prompt: str, ids: list[int]) -> bool:
    from vllm_blockdiff.testing.tiny_checkpoints import IM_END_ID
    from vllm_blockdiff.testing.trained_bd3lm import answer_of

    return IM_END_ID in ids and tokenizer.decode(ids[: ids.index(IM_END_ID)]) == answer_of(prompt)


@pytest.fixture(scope="module")
def decoded(llm, prompts):
    """Every rule's completions of every prompt, all rules' requests in one batch."""
    texts, ids = prompts
    requests = [(name, p) for name in RULES for p in ids]
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                             extra_args={"steps": MAX_TOKENS, **RULES[name]}) for name, _ in requests]
    outs = llm.generate([{"prompt_token_ids": p} for _, p in requests], params, use_tqdm=False)
    by_rule: dict[str, list] = {name: [] for name in RULES}
    for (name, _), out in zip(requests, outs):
        by_rule[name].append(out.outputs[0])
    return by_rule


@pytest.mark.parametrize("rule", list(RULES))
def test_each_rule_decodes_as_the_reference(decoded, ref_model, prompts, rule):
    from vllm_blockdiff.testing.tiny_checkpoints import IM_END_ID

    for prompt, completion in zip(prompts[1], decoded[rule]):
        forwards: list[int] = []
        expected = generate_bd3lm(ref_model, prompt, max_new_tokens=MAX_TOKENS, steps=MAX_TOKENS,
                                  eos_ids=(IM_END_ID,), forwards=forwards, **RULES[rule])
        assert list(completion.token_ids) == truncate_at_stop(expected), rule
        assert sum(completion.spec_decode_metrics.histogram) == forwards[0], rule


def test_answers_are_right_and_confident_rules_take_fewer_forwards(llm, decoded, prompts):
    tokenizer = llm.get_tokenizer()
    accuracy, per_forward = {}, {}
    for rule, completions in decoded.items():
        right = [_answer_is_right(tokenizer, text, list(c.token_ids)) for text, c in zip(prompts[0], completions)]
        accuracy[rule] = sum(right) / len(right)
        per_forward[rule] = (sum(len(c.token_ids) for c in completions)
                             / sum(sum(c.spec_decode_metrics.histogram) for c in completions))
    # The card commits one token per forward; τ = 0.9 and f = 1 keep (nearly) its answers with far fewer.
    assert per_forward["card"] <= 1.05, per_forward
    assert accuracy["card"] >= 0.75, accuracy
    for rule in ("threshold_0.9", "factor_1"):
        assert per_forward[rule] >= 2.0, per_forward
        assert accuracy[rule] >= accuracy["card"] - 0.15, accuracy
    assert per_forward["threshold_0.5"] > per_forward["threshold_0.9"], per_forward
