"""A tiny SDLM checkpoint *trained* (on CPU, in about a minute) so that its windows are confident.

Random weights never make a window confident, so accept lengths stay at 1. This trains the
published SDLM layout (``build_sdlm_checkpoint``'s config, tokenizer and weight names) on a
synthetic language whose continuations are mostly predictable:

    text = runs of letters " a".." z" counting with a step: " c e g i k" | " q r s t u v w" | ...

Each run starts at a random letter with a random step (1..3) and lasts 4..12 tokens. Inside a
run the next D tokens follow from the last two; at a run boundary nothing does. So a window's
confidence is high for the tokens the run will still cover and falls where the run may end:
mixed accept lengths, and at a high threshold the accepted prefixes are the tokens greedy
one-at-a-time decoding would produce anyway.

Training objective (SDLM's): AR next-token loss on the causal sequence plus, for several cut
points L per sequence, the window ``[x_{L-1}, MASK x (D-1)]`` (positions L-1.., attending to
``x_0..x_{L-2}`` and to itself) predicting ``x_L .. x_{L+D-1}``. Only the letters' rows of the
lm_head are trained; all other rows stay exactly zero, so the full-vocabulary softmax is
``exp(l) / (sum_letters exp(l) + (V - 26))`` and training computes it exactly on 26 rows.

The result is deterministic (seeded, one thread) and cached by its parameters under
``tiny_checkpoints.cache_dir()``.

CLI::

    python -m vllm_blockdiff.testing.trained_sdlm --out /tmp/sdlm-letters --block-size 4
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import torch

from vllm_blockdiff.testing.task_training import TaskRows, blank_qwen2, learning_rate, one_thread, save_trained
from vllm_blockdiff.testing.tiny_checkpoints import (
    MASK_TOKEN_ID,
    SDLM_VOCAB_SIZE,
    build_sdlm_checkpoint,
    cached_build,
    load_qwen_ranks,
)

_FORMAT_VERSION = 2  # bump when training or the layout changes, to invalidate cached checkpoints
SHAPE = dict(hidden=64, layers=4, heads=2, kv_heads=1, intermediate=256)


def letter_ids() -> list[int]:
    """Token ids of " a" .. " z" in the Qwen2.5 vocabulary."""
    ranks = load_qwen_ranks()
    return [ranks[f" {chr(ord('a') + i)}".encode()] for i in range(26)]


def sample_text(rng: random.Random, length: int) -> list[int]:
    """Letter indices 0..25: a repeated random pattern (period 2..6), or counting (random start,
    step 1..3), either as one run or as runs of 8..24 tokens that restart anywhere."""
    kind = rng.random()
    if kind < 0.5:
        pattern = [rng.randrange(26) for _ in range(rng.randint(2, 6))]
        return [pattern[k % len(pattern)] for k in range(length)]
    out: list[int] = []
    while len(out) < length:
        start, step = rng.randrange(26), rng.randint(1, 3)
        run = length if kind < 0.8 else rng.randint(8, 24)
        out.extend((start + step * k) % 26 for k in range(run))
    return out[:length]


def _window_batch(texts: list[list[int]], ids: torch.Tensor, D: int, cuts: int, rng: random.Random):
    """Input ids, positions, additive 4-D masks and targets for sequences + ``cuts`` windows each."""
    T = len(texts[0])
    n = T + cuts * D
    input_ids = torch.empty(len(texts), n, dtype=torch.long)
    positions = torch.empty(len(texts), n, dtype=torch.long)
    allowed = torch.zeros(len(texts), n, n, dtype=torch.bool)
    targets = torch.full((len(texts), n), -100, dtype=torch.long)  # letter index, -100 = no loss
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for b, text in enumerate(texts):
        letters = torch.tensor(text)
        input_ids[b, :T] = ids[letters]
        positions[b, :T] = torch.arange(T)
        allowed[b, :T, :T] = causal
        targets[b, : T - 1] = letters[1:]
        for k, L in enumerate(rng.sample(range(2, T - D + 1), cuts)):
            s = T + k * D
            input_ids[b, s] = ids[text[L - 1]]
            input_ids[b, s + 1 : s + D] = MASK_TOKEN_ID
            positions[b, s : s + D] = torch.arange(L - 1, L - 1 + D)
            allowed[b, s : s + D, : L - 1] = True  # x_0 .. x_{L-2}, not the causal x_{L-1}
            allowed[b, s : s + D, s : s + D] = True
            targets[b, s : s + D] = letters[L : L + D]
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return input_ids, positions, mask[:, None], targets


def train(model, D: int, *, steps: int, seed: int, batch: int = 32, text_len: int = 40, cuts: int = 8,
          lr: float = 5e-3) -> float:
    """Train ``model`` (a transformers Qwen2ForCausalLM in the SDLM layout) in place; returns the last loss.

    Only the rows the task uses are trained (26 letters + the mask in the embedding, 26 letters in
    the lm_head); the lm_head's other rows are set to exactly zero.
    """
    ids = torch.tensor(letter_ids())
    rows = torch.cat([ids, torch.tensor([MASK_TOKEN_ID])])
    row_of = {int(t): i for i, t in enumerate(rows)}
    task = TaskRows(model, rows.tolist(), ids.tolist())
    params = [p for p in model.parameters() if p.requires_grad] + [task.embed, task.head]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    loss_value = float("nan")
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        texts = [sample_text(rng, text_len) for _ in range(batch)]
        input_ids, positions, mask, targets = _window_batch(texts, ids, D, cuts, rng)
        inputs = task.embed[input_ids.apply_(row_of.__getitem__)]
        hidden = model.model(inputs_embeds=inputs, attention_mask=mask, position_ids=positions).last_hidden_state
        keep = targets >= 0
        logits = hidden[keep] @ task.head.T
        loss = (task.log_z(logits) - logits.gather(-1, targets[keep][:, None]).squeeze(-1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_value = float(loss.detach())
    task.store(model)
    return loss_value


def build_trained_sdlm_checkpoint(out_dir: str | os.PathLike, *, D: int = 4, steps: int = 1000, seed: int = 0) -> Path:
    """Write the trained letters checkpoint (window ``D``) to ``out_dir``; cached across calls."""
    return cached_build("sdlm-letters", [_FORMAT_VERSION, D, steps, seed, SHAPE],
                        lambda tmp: _build(tmp, D=D, steps=steps, seed=seed), out_dir)


def _build(out: Path, *, D: int, steps: int, seed: int) -> None:
    build_sdlm_checkpoint(out, D=D, seed=seed, **SHAPE)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == SDLM_VOCAB_SIZE
    with one_thread():
        torch.manual_seed(seed)
        model = blank_qwen2(out)
        loss = train(model, D, steps=steps, seed=seed)
    save_trained(model, out)
    (out / "TRAINING.json").write_text(json.dumps({"task": "letter counting runs", "D": D, "steps": steps,
                                                   "seed": seed, "final_loss": loss}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m vllm_blockdiff.testing.trained_sdlm",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--block-size", type=int, default=4, help="the window D")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_trained_sdlm_checkpoint(args.out, D=args.block_size, steps=args.steps, seed=args.seed)
    print(path)
    return path


if __name__ == "__main__":
    main()
