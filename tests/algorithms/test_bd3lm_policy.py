"""The card's BD3LM rules as pure functions (no vLLM)."""

import numpy as np
import pytest
import torch

from vllm_blockdiff.algorithms import bd3lm

MASK = 99


@pytest.mark.parametrize(
    "masks,steps,expected",
    [(32, 32, [1] * 32), (32, 8, [4] * 8), (27, 20, [2] * 7 + [1] * 13), (5, 8, [1] * 5), (7, 3, [3, 2, 2])],
)
def test_transfer_schedule_is_uniform_split_without_empty_steps(masks, steps, expected):
    assert bd3lm.transfer_schedule(masks, steps) == expected
    assert sum(expected) == masks


def test_steps_per_block_follows_card():
    assert bd3lm.steps_per_block(128, 128, 32) == 32
    assert bd3lm.steps_per_block(40, 40, 32) == 20
    assert bd3lm.steps_per_block(16, 70, 32) == 6


@pytest.mark.parametrize("num_tokens,expected", [(0, 32), (5, 27), (32, 32), (63, 1)])
def test_first_chunk_completes_partial_block(num_tokens, expected):
    assert bd3lm.first_chunk_len(num_tokens, 32) == expected


def test_next_chunk_is_capped_by_remaining_budget():
    assert bd3lm.next_chunk_len(40, 20, 30, 32) == 10


def test_low_confidence_commits_most_confident_masked_positions():
    logits = torch.full((4, 8), -5.0)
    logits[0, 1] = 1.0  # weak
    logits[1, 2] = 9.0  # strongest
    logits[2, 3] = 5.0
    logits[3, 4] = 20.0  # already committed position: ignored
    canvas = torch.tensor([MASK, MASK, MASK, 7])
    out = bd3lm.denoise_step(logits, canvas, MASK, 2)
    assert out.tolist() == [MASK, 2, 3, 7]


def test_committed_tokens_never_change_and_k_is_capped():
    logits = torch.randn(3, 10)
    canvas = torch.tensor([4, MASK, 5])
    out = bd3lm.denoise_step(logits, canvas, MASK, 5)
    assert out.tolist() == [4, int(logits[1].argmax()), 5]


def test_sampling_is_reproducible_per_generator_and_differs_across_seeds():
    logits = torch.randn(6, 50)
    canvas = torch.full((6,), MASK)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return bd3lm.denoise_step(logits, canvas, MASK, 3, temperature=1.0, remasking="random", generator=g)

    assert torch.equal(run(1), run(1))
    assert any(not torch.equal(run(1), run(s)) for s in range(2, 6))


def test_gumbel_argmax_matches_card_formula():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    logits = torch.randn(5, 40)
    ours = bd3lm.gumbel_argmax(logits, 0.7, g1)
    u = torch.rand(logits.shape, dtype=torch.float64, generator=g2)
    card = (logits.to(torch.float64).exp() / (-torch.log(u)) ** 0.7).argmax(-1)
    assert torch.equal(ours, card)


def test_unknown_remasking_is_rejected():
    with pytest.raises(ValueError, match="remasking"):
        bd3lm.denoise_step(torch.randn(2, 5), torch.tensor([MASK, MASK]), MASK, 1, remasking="bogus")


@pytest.mark.parametrize("remasking,temperature", [("low_confidence", 0.0), ("random", 0.0), ("low_confidence", 0.9)])
def test_logits_at_masked_positions_only_give_the_same_step(remasking, temperature):
    """The engine skips the lm_head at committed canvas positions; the step must not notice."""
    torch.manual_seed(0)
    logits = torch.randn(8, 30)
    canvas = torch.tensor([MASK, 3, MASK, MASK, 4, MASK, 5, MASK])
    positions = torch.nonzero(canvas == MASK).squeeze(-1)
    full = bd3lm.denoise_step(logits, canvas, MASK, 2, temperature=temperature, remasking=remasking,
                              generator=torch.Generator().manual_seed(1))
    part = bd3lm.denoise_step(logits[positions], canvas, MASK, 2, temperature=temperature, remasking=remasking,
                              generator=torch.Generator().manual_seed(1), positions=positions)
    assert torch.equal(full, part)


def test_batched_step_equals_one_step_per_chunk():
    """Requests batched in one step do not influence each other (own generator, own rows)."""
    torch.manual_seed(1)
    specs = [
        (torch.tensor([MASK, MASK, 3, MASK]), 2, 0.0, "low_confidence"),
        (torch.tensor([MASK, 5, MASK]), 1, 0.8, "low_confidence"),
        (torch.tensor([MASK, MASK, MASK, MASK, MASK]), 3, 0.0, "random"),
        (torch.tensor([1, 2]), 1, 0.0, "low_confidence"),  # nothing masked
    ]
    logits_rows, batch, singles = [], [], []
    for j, (canvas, k, temp, rm) in enumerate(specs):
        positions = torch.nonzero(canvas == MASK).squeeze(-1)
        rows = torch.randn(len(positions), 40)
        logits_rows.append(rows)
        batch.append(bd3lm.ChunkStep(canvas.numpy(), positions.numpy(), k, temp, rm, torch.Generator().manual_seed(j)))
        singles.append(bd3lm.denoise_step(rows, canvas, MASK, k, temperature=temp, remasking=rm,
                                          generator=torch.Generator().manual_seed(j), positions=positions))
    result = bd3lm.denoise_batch(torch.cat(logits_rows), batch, MASK)
    got = [torch.from_numpy(c[: len(s.canvas)]) for c, s in zip(result.canvases, batch)]
    assert all(torch.equal(a, b) for a, b in zip(got, singles))
    assert not torch.equal(got[0], specs[0][0]) and torch.equal(got[3], specs[3][0])


def test_commit_counts_follow_the_published_rules():
    """Batched counts against the reference's rule (threshold, factor, the card's floor), random inputs."""
    import math
    import random

    from tests.reference.bd3lm_reference import commit_count

    rng = random.Random(0)
    for _ in range(300):
        width = rng.randint(1, 10)
        conf = [rng.choice([rng.random(), 1.0, 0.999, -math.inf]) for _ in range(width)]
        k = rng.randint(1, 4)
        threshold = rng.choice([None, rng.random()])
        factor = None if threshold is not None else rng.choice([None, rng.uniform(0.2, 4)])
        values = torch.tensor(conf)
        expected = commit_count(values, k, threshold, factor)
        got = bd3lm.commit_counts(
            values.sort(descending=True).values[None].numpy(), torch.isfinite(values).sum()[None].numpy(),
            np.array([k]), np.array([math.nan if threshold is None else threshold]),
            np.array([math.nan if factor is None else factor]),
        )
        assert int(got[0]) == expected, (conf, k, threshold, factor)


def test_threshold_finishes_a_confident_chunk_in_one_step():
    logits = torch.full((4, 8), -10.0)
    for i, t in enumerate((1, 2, 3, 4)):
        logits[i, t] = 10.0  # p ~ 1 at every position
    canvas = torch.full((4,), MASK)
    assert bd3lm.denoise_step(logits, canvas, MASK, 1, threshold=0.9).tolist() == [1, 2, 3, 4]
    assert bd3lm.denoise_step(logits, canvas, MASK, 1).tolist().count(MASK) == 3  # the card: one
    assert bd3lm.denoise_step(logits, canvas, MASK, 1, factor=1.0).tolist() == [1, 2, 3, 4]


def test_left_frontier_commits_the_leftmost_mask_then_the_selected_run():
    masked = np.array([False, True, True, True, False, True])
    # The rule selected positions 2 and 3 and 5: the run from the leftmost mask (1, forced) goes on
    # through 2 and 3, the committed 4 is skipped, 5 continues it.
    assert bd3lm.left_frontier(np.array([0, 0, 1, 1, 0, 1], bool), masked).tolist() == [1, 2, 3, 5]
    # A gap in the selection ends the run.
    assert bd3lm.left_frontier(np.array([0, 1, 0, 1, 0, 1], bool), masked).tolist() == [1]
    assert bd3lm.left_frontier(np.zeros(6, bool), np.zeros(6, bool)).tolist() == []


def test_left_frontier_step_keeps_the_canvas_a_prefix():
    vocab, mask = 10, 9
    logits = torch.full((6, vocab), -5.0)
    logits[torch.arange(6), torch.tensor([1, 2, 3, 4, 5, 6])] = torch.tensor([0.1, 0.1, 9.0, 9.0, 9.0, 9.0])
    logits[:2, 7] = 0.0  # positions 0 and 1 are torn between two tokens: confidence ~0.5
    canvas = np.full(6, mask)
    step = bd3lm.ChunkStep(canvas, np.arange(6), 2, threshold=0.6, left_frontier=True)
    # Without the frontier, τ commits 2..5 (confident); with it only the leftmost mask, 0, commits.
    [free] = bd3lm.denoise_batch(logits, [bd3lm.ChunkStep(canvas, np.arange(6), 2, threshold=0.6)], mask).canvases
    [left] = bd3lm.denoise_batch(logits, [step], mask).canvases
    assert free.tolist() == [mask, mask, 3, 4, 5, 6]
    assert left.tolist() == [1, mask, mask, mask, mask, mask]
    step = bd3lm.ChunkStep(np.array([1, mask, mask, mask, mask, mask]), np.arange(1, 6), 2, threshold=0.6,
                           left_frontier=True)
    [after] = bd3lm.denoise_batch(logits[1:], [step], mask).canvases
    assert after.tolist() == [1, 2, 3, 4, 5, 6]  # the leftmost (forced), then the confident run
