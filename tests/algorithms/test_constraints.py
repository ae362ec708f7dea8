"""Vocabulary constraints as pure functions, against the reference rules written from the definitions."""

from __future__ import annotations

import random

import torch

from tests.reference.vocab_rules import RefVocabRules
from vllm_blockdiff.algorithms.constraints import UNKNOWN, VocabConstraints, allowed_prefix, completing_tokens


def _ref_seq(seq):
    return [None if t == UNKNOWN else t for t in seq]


def test_completing_tokens_against_the_definition():
    rng = random.Random(0)
    for _ in range(300):
        words = [[rng.randrange(6) for _ in range(rng.randint(1, 3))] for _ in range(rng.randint(1, 3))]
        seq = [rng.choice([UNKNOWN, *range(6)]) for _ in range(rng.randint(0, 8))]
        index = rng.randint(0, len(seq))
        ref = RefVocabRules(bad_words=words)
        expected = {t for t in range(6) if ref.completes_bad_word(_ref_seq(seq), index, t)}
        assert completing_tokens(seq, index, words) == expected, (seq, index, words)


def test_apply_matches_the_reference_rules():
    rng = random.Random(1)
    vocab = 12
    for _ in range(100):
        bias = {rng.randrange(vocab): rng.uniform(-3, 3) for _ in range(2)}
        allowed = sorted(rng.sample(range(vocab), 7)) if rng.random() < 0.5 else None
        bad = [[rng.randrange(vocab)] for _ in range(rng.randint(0, 1))] + [
            [rng.randrange(vocab) for _ in range(2)] for _ in range(rng.randint(0, 2))]
        stops, min_tokens = (3, 4), rng.randint(0, 6)
        params = type("P", (), dict(logit_bias=bias, allowed_token_ids=allowed, bad_words_token_ids=bad,
                                    all_stop_token_ids=set(stops), min_tokens=min_tokens))()
        constraints = VocabConstraints.from_params(params)
        seq = [rng.choice([UNKNOWN, *range(vocab)]) for _ in range(6)]
        indices = [rng.randint(0, 6) for _ in range(3)]
        logits = torch.randn(3, vocab)
        ref = RefVocabRules(logit_bias=bias, allowed_token_ids=allowed, bad_words=bad, stop_ids=stops,
                            min_tokens=min_tokens).apply(logits, _ref_seq(seq), indices)
        got = constraints.apply(logits, seq, indices) if constraints is not None else logits
        assert torch.equal(got, ref)


def test_nothing_asked_means_no_constraints():
    params = type("P", (), dict(logit_bias=None, allowed_token_ids=None, bad_words_token_ids=None,
                                all_stop_token_ids={3}, min_tokens=0))()
    assert VocabConstraints.from_params(params) is None


def test_allowed_prefix_stops_before_a_completed_bad_word():
    params = type("P", (), dict(logit_bias=None, allowed_token_ids=None, bad_words_token_ids=[[7, 8]],
                                all_stop_token_ids=set(), min_tokens=0))()
    constraints = VocabConstraints.from_params(params)
    assert allowed_prefix(constraints, [1, 2], [5, 7, 8, 9]) == 2  # 7 then 8 would complete [7, 8]
    # The first token is trusted: its row was constrained with the whole output known.
    assert allowed_prefix(constraints, [1, 7], [8, 9]) == 2
    assert allowed_prefix(constraints, [1, 2], [7, 9, 8]) == 3


def test_bitmask_unpacking_matches_the_word_layout():
    """vLLM/xgrammar bitmasks: int32 words, token t allowed iff bit t % 32 of word t // 32 is set."""
    import numpy as np

    from vllm_blockdiff.algorithms.constraints import allowed_by_bitmask

    rng = random.Random(5)
    vocab = 100
    allowed = [[rng.random() < 0.3 for _ in range(vocab)] for _ in range(3)]
    words = np.zeros((3, (vocab + 31) // 32), dtype=np.int32)
    for r, row in enumerate(allowed):
        for t, ok in enumerate(row):
            if ok:
                words[r, t // 32] |= np.int32(np.uint32(1 << (t % 32)).view(np.int32))
    assert allowed_by_bitmask(words, vocab).tolist() == allowed
    assert allowed_by_bitmask(words, vocab + 40)[:, vocab:].sum() == 0  # the model's padding rows
