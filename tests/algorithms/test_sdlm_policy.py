"""SDLM's window rules as pure functions (no vLLM)."""

import math

import pytest
import torch

from vllm_blockdiff.algorithms import sdlm


@pytest.mark.parametrize(
    "confidence,threshold,expected",
    [
        ([0.9, 0.8, 0.7, 0.6], 0.5, 4),
        ([0.9, 0.8, 0.4, 0.95], 0.5, 2),  # the run stops at the first miss, later hits do not count
        ([0.1, 0.9, 0.9, 0.9], 0.5, 1),  # the first token always commits
        ([0.5, 0.5], 0.5, 1),  # strict: equal is not above
        ([0.3, 0.2, 0.1], 0.0, 3),
        ([1.0, 1.0, 1.0], 1.0, 1),
    ],
)
def test_accept_length_is_the_leading_confident_run(confidence, threshold, expected):
    assert sdlm.accept_length(torch.tensor(confidence), threshold) == expected


def test_greedy_confidence_is_the_top_probability_or_normalised_entropy():
    logits = torch.tensor([[4.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    tokens, conf = sdlm.sample_window(logits)
    probs = torch.softmax(logits, -1)
    assert tokens.tolist() == [0, 0]
    torch.testing.assert_close(conf, probs.max(-1).values)
    _, entropy_conf = sdlm.sample_window(logits, entropy_conf=True)
    assert entropy_conf[1].item() == pytest.approx(0.0, abs=1e-6)  # uniform: maximal entropy
    h = -(probs[0] * probs[0].log()).sum()
    assert entropy_conf[0].item() == pytest.approx(1 - h.item() / math.log(4), abs=1e-5)


def test_filters_follow_sdlm_top_p_then_top_k():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    lowest = torch.finfo(torch.float32).min
    # softmax mass of the sorted tokens: .64 .23 .09 .03 .01; top_p=0.8 keeps the first two (the one crossing).
    kept = sdlm.filter_logits(logits, top_p=0.8, top_k=0)
    assert (kept[0] > lowest).tolist() == [True, True, False, False, False]
    assert (sdlm.filter_logits(logits, 1.0, 3)[0] > lowest).tolist() == [True, True, True, False, False]


def test_sampling_draws_from_the_filtered_distribution_and_is_seeded():
    logits = torch.tensor([[2.0, 1.0, 0.5, -3.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    tokens, conf = sdlm.sample_window(logits, temperature=1.0, top_k=3, generator=g)
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.5]), -1)
    torch.testing.assert_close(freq[:3], expected, atol=0.03, rtol=0)
    assert freq[3] == 0  # filtered by top_k
    torch.testing.assert_close(conf, expected[tokens])
    again, _ = sdlm.sample_window(logits, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)


def test_batched_windows_commit_what_each_request_commits_alone():
    torch.manual_seed(0)
    logits = torch.randn(19, 50) * 4
    requests = [
        sdlm.WindowRequest(4, threshold=0.0),
        sdlm.WindowRequest(3, threshold=0.3, entropy_conf=True),
        sdlm.WindowRequest(4, threshold=0.2, temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(1)),
        sdlm.WindowRequest(4, threshold=2.0),
        sdlm.WindowRequest(4, threshold=0.5),
    ]
    committed = sdlm.commit_windows(logits, requests)
    alone = [
        sdlm.sample_window(logits[0:4]),
        sdlm.sample_window(logits[4:7], entropy_conf=True),
        sdlm.sample_window(logits[7:11], temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(1)),
        sdlm.sample_window(logits[11:15]),
        sdlm.sample_window(logits[15:19]),
    ]
    expected = [tokens[: sdlm.accept_length(conf, r.threshold)].tolist() for r, (tokens, conf) in zip(requests, alone)]
    assert committed == expected
    assert [len(c) for c in committed][:1] == [4] and len(committed[3]) == 1
    assert len({len(c) for c in committed}) > 1


@pytest.mark.parametrize(
    "draft,first_predictions,expected",
    [
        ([5, 6, 7, 8], [6, 7, 8], 4),
        ([5, 6, 7, 8], [6, 0, 8], 2),  # row 1 predicts 0 after [5, 6]: 7 is rejected, so is 8
        ([5, 6, 7, 8], [9, 7, 8], 1),  # the first draft token always commits
    ],
)
def test_self_speculative_accepts_drafts_while_they_match_the_verify_rows(draft, first_predictions, expected):
    assert sdlm.verified_length(draft, first_predictions) == expected


def test_window_predictions_are_the_argmax_or_a_seeded_draw():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    assert sdlm.window_predictions(logits, sdlm.WindowRequest(2)) == [1, 0]
    sampled = sdlm.WindowRequest(2, temperature=1.0, generator=torch.Generator().manual_seed(3))
    again = sdlm.WindowRequest(2, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert sdlm.window_predictions(logits, sampled) == sdlm.window_predictions(logits, again)


def test_greedy_windows_in_rounds_and_in_one_pass_agree():
    """The CPU path (rows in rounds) and the accelerator path (every row at once) commit the same."""
    g = torch.Generator().manual_seed(7)
    for _ in range(20):
        requests = [sdlm.WindowRequest(4, threshold=t, entropy_conf=e)
                    for t, e in [(0.0, False), (0.2, False), (0.5, True), (0.9, False), (2.0, False)]]
        logits = torch.randn(4 * len(requests), 50, generator=g) * 3
        assert sdlm.commit_windows(logits, requests, rounds=True) == sdlm.commit_windows(logits, requests, rounds=False)
