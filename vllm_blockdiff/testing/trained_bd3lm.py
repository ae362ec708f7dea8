"""A tiny BD3LM checkpoint *trained* (on CPU, in about three minutes) on digit tasks with known answers.

Random weights make every answer wrong and no position confident, so neither quality nor tokens per forward
mean anything. This trains the published dLLM A2D-Qwen2 layout (``build_bd3lm_checkpoint``'s config,
tokenizer and weight names, ``lm_head.weight`` stored although tied) on synthetic *text* prompts whose answer
is fully determined by the prompt, tokenized with the real Qwen2.5 tokenizer (digits are single tokens)::

    prompt                   answer
    "copy 48213="            "48213<|im_end|>"       each answer token is one prompt token: parallel-friendly
    "sort 48213="            "12348<|im_end|>"       each token depends on counts over the whole prompt, and
                                                     neighbouring answer tokens constrain each other

Digit strings have 4..16 digits, so prompts are 7..19 tokens and answers (with ``<|im_end|>``) 5..17: the
answer starts mid-block and sometimes crosses the block boundary (block 32). ``answer_of(prompt)`` gives the
expected text, ``heldout_prompts(n)`` evaluation prompts (another seed than training), ``evaluate(ckpt)``
exact-match accuracy with the reference decoder (the seed card's ``generate()``).

Training sequence: ``x0 = prompt + answer + <|im_end|> + <|endoftext|>...`` up to the end of the block
holding ``<|im_end|>`` (dLLM's SFT collator pads responses to a block multiple and trains the padding).

Objective: dLLM's BD3LM trainer (``dllm/core/trainers/bd3lm.py``): blocks of ``block_size`` aligned at
position 0; every response/pad position (never the prompt) is masked with probability t; the model sees
``[xt ; x0]`` (same position ids for both halves) under the block-diffusion mask: xt block b attends to xt
block b and to x0 blocks < b, x0 block b to x0 blocks <= b; cross-entropy at the masked xt positions, no
logit shift. Where this differs from dLLM, on purpose:

* t ~ U(1e-3, 1) is drawn per *block* (BD3LM's per-block noise), not once per sequence as dLLM does.
* Plain mean over masked tokens instead of dLLM's default 1/t weighting (``loss_weight_type="scheduler"``,
  token-normalised): with 1/t the positional task (copy) stayed at chance within the budget (rare, nearly
  clean blocks dominate the gradient), with the plain mean it is learned.
* Prompt queries in xt do not attend to the response positions of their own block. The card's decoder
  encodes the prompt's partial last block in a prefix pass *without* the chunk being denoised
  (DESIGN.md §2 "Trap"); trained with dLLM's mask, where the prompt tail sees the masked response, this
  model scored ~98% in the training view but ~11% with the reference decoder. (The x0 half is unchanged:
  after a block completes, the decoder re-encodes it with the staircase mask, exactly the x0 view.)
* ``<|im_end|>`` targets are label-smoothed (``EOS_SMOOTHING``: the rest spread over the other task rows),
  so its confidence stays near 1 - EOS_SMOOTHING. The card stops as soon as a chunk holds an eos, masks
  still in it; a model surer of where the answer ends than of its digits commits ``<|im_end|>`` first and
  returns masks (what the unsmoothed model did). Its pads (``<|endoftext|>``, not an eos id for the card)
  are confident and are committed early, as real BD3LM models do with trailing padding.
* Linear weights start at N(0, 1/fan_in) rather than transformers' N(0, 0.02): the positional lookups of
  copy are learned several hundred steps earlier.

Only the rows the task uses are trained (digits, the words and symbols of the prompts, the specials and
the mask in the embedding; digits, ``<|im_end|>`` and ``<|endoftext|>`` in the lm_head). The lm_head's other
rows are exactly zero, so the full-vocabulary log-softmax is ``logsumexp(task logits) ⊕ log(V - K)`` and
training computes it exactly on K rows.

The result is deterministic (seeded, one thread) and cached by its parameters under
``tiny_checkpoints.cache_dir()``. What it is for: engine tests and benchmarks that need a BD3LM model whose
answers can be checked (quality vs speed of parallel commit rules) and whose confidences are meaningful.

CLI::

    python -m vllm_blockdiff.testing.trained_bd3lm --out /tmp/bd3lm-digits
    python -m vllm_blockdiff.testing.trained_bd3lm --out /tmp/bd3lm-digits --evaluate 200
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from vllm_blockdiff.testing.task_training import TaskRows, blank_qwen2, learning_rate, one_thread, save_trained
from vllm_blockdiff.testing.tiny_checkpoints import (
    ENDOFTEXT_ID,
    IM_END_ID,
    MASK_TOKEN_ID,
    build_bd3lm_checkpoint,
    build_qwen25_tokenizer,
    cached_build,
)

_FORMAT_VERSION = 1  # bump when training changes, to invalidate cached checkpoints
SHAPE = dict(hidden=128, layers=4, heads=2, kv_heads=1, intermediate=256)  # head_dim 64
DIGITS = {"copy": (4, 16), "sort": (4, 12)}  # task -> (min, max) number of digits
TASKS = tuple(DIGITS)
EOS_SMOOTHING = 0.4
HELDOUT_SEED = 1_000_003  # training draws its prompts from random.Random(seed) with small seeds
_TIME_EPS = 1e-3  # t ~ U(eps, 1), as dLLM's time_epsilon


# ---------------------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------------------
def sample_prompt(rng: random.Random, task: str | None = None) -> str:
    """A prompt ``"<task> <digits>="`` (task drawn uniformly unless given, length uniform in ``DIGITS[task]``)."""
    task = task or rng.choice(TASKS)
    if task not in DIGITS:
        raise ValueError(f"unknown task {task!r}; valid: {TASKS}")
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(*DIGITS[task])))
    return f"{task} {digits}="


def answer_of(prompt: str) -> str:
    """The expected answer text (without ``<|im_end|>``) of a prompt made by :func:`sample_prompt`."""
    task, _, rest = prompt.partition(" ")
    if not rest.endswith("=") or not rest[:-1].isdigit():
        raise ValueError(f"not a task prompt: {prompt!r}")
    digits = rest[:-1]
    if task == "copy":
        return digits
    if task == "reverse":
        return digits[::-1]
    if task == "sort":
        return "".join(sorted(digits))
    if task == "count":  # count up from the first digit (mod 10), as many digits as given
        return "".join(str((int(digits[0]) + i) % 10) for i in range(len(digits)))
    raise ValueError(f"unknown task in {prompt!r}")


def heldout_prompts(n: int, seed: int = HELDOUT_SEED) -> list[str]:
    """``n`` evaluation prompts, the tasks in turn (round robin), from a seed training does not use."""
    rng = random.Random(seed)
    return [sample_prompt(rng, TASKS[i % len(TASKS)]) for i in range(n)]


def task_of(prompt: str) -> str:
    return prompt.partition(" ")[0]


_TOKENIZER = None


def _tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = build_qwen25_tokenizer("<|mask|>")
    return _TOKENIZER


def encode(prompt: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids + ``<|im_end|>``) with the Qwen2.5 tokenizer."""
    tok = _tokenizer()
    return tok.encode(prompt).ids, tok.encode(answer_of(prompt)).ids + [IM_END_ID]


def _rows() -> tuple[list[int], list[int]]:
    """Token ids whose embedding rows are trained, and those whose lm_head rows are (a prefix of the first)."""
    tok = _tokenizer()
    head = [tok.token_to_id(str(d)) for d in range(10)] + [IM_END_ID, ENDOFTEXT_ID]
    words = [tok.encode(t).ids for t in (*TASKS, " ", "=")]
    assert all(len(w) == 1 for w in words), words
    return head + [w[0] for w in words] + [MASK_TOKEN_ID], head


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------
def _bd3lm_mask(prompt_lens: Sequence[int], num_blocks: int, block_size: int) -> torch.Tensor:
    """``[B, n, n]`` bool for the input ``[xt (num_blocks blocks) ; x0 blocks 0 .. num_blocks-2]``.

    dLLM's ``block_diff_mask`` (xt_b -> xt_b, xt_b -> x0_<b, x0_b -> x0_<=b), with prompt queries of xt not
    seeing the response part of their block (the card's prefix pass). The x0 copy of the last block is left
    out: nothing may attend to it, so the loss is exactly that of the full ``[xt ; x0]``.
    """
    L = num_blocks * block_size
    n = L + (num_blocks - 1) * block_size
    idx = torch.arange(n)
    pos = torch.where(idx < L, idx, idx - L)
    blk, is_x0 = pos // block_size, idx >= L
    qb, kb, qx, kx = blk[:, None], blk[None, :], is_x0[:, None], is_x0[None, :]
    allowed = ((qb == kb) & ~qx & ~kx) | ((kb < qb) & ~qx & kx) | ((kb <= qb) & qx & kx)
    allowed = allowed.repeat(len(prompt_lens), 1, 1)
    for b, p in enumerate(prompt_lens):
        allowed[b, :p, p:L] = False  # prompt (xt) queries do not see the response
    return allowed


def _group_batch(examples, block_size: int, row_of: dict, head_of: dict, gen: torch.Generator):
    """Inputs for examples that all span the same number of blocks."""
    num_blocks = -(-(len(examples[0][0]) + len(examples[0][1])) // block_size)
    L = num_blocks * block_size
    x0 = torch.tensor([p + a + [ENDOFTEXT_ID] * (L - len(p) - len(a)) for p, a in examples])
    prompt_lens = [len(p) for p, _ in examples]
    response = torch.arange(L)[None, :] >= torch.tensor(prompt_lens)[:, None]
    t = _TIME_EPS + (1 - _TIME_EPS) * torch.rand(len(examples), num_blocks, generator=gen)
    masked = (torch.rand(len(examples), L, generator=gen) < t.repeat_interleave(block_size, dim=1)) & response
    xt = torch.where(masked, MASK_TOKEN_ID, x0)
    tokens = torch.cat([xt, x0[:, : L - block_size]], dim=1)
    rows = torch.tensor([[row_of[i] for i in r] for r in tokens.tolist()])
    targets = torch.tensor([[head_of.get(i, -100) for i in r] for r in x0.tolist()])
    targets = torch.where(masked, targets, -100)
    positions = torch.cat([torch.arange(L), torch.arange(L - block_size)])[None].expand(len(examples), -1)
    allowed = _bd3lm_mask(prompt_lens, num_blocks, block_size)
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return rows, positions, mask[:, None], targets


def train(model, *, block_size: int, steps: int, seed: int, batch: int = 32, lr: float = 1e-3) -> float:
    """Train ``model`` (a transformers Qwen2ForCausalLM, untied head) in place; returns the last loss.

    Only the task's rows of the embedding and the lm_head are trained; the lm_head's other rows are set to
    exactly zero.
    """
    embed_ids, head_ids = _rows()
    row_of = {t: i for i, t in enumerate(embed_ids)}
    head_of = {t: i for i, t in enumerate(head_ids)}
    eos_row, K = head_of[IM_END_ID], len(head_ids)
    task = TaskRows(model, embed_ids, head_ids)
    params = [p for p in model.parameters() if p.requires_grad] + [task.embed, task.head]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    loss_value = float("nan")
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        by_blocks: dict[int, list] = {}
        for _ in range(batch):
            p, a = encode(sample_prompt(rng))
            by_blocks.setdefault(-(-(len(p) + len(a)) // block_size), []).append((p, a))
        nll = []
        for num_blocks in sorted(by_blocks):
            rows, positions, mask, targets = _group_batch(by_blocks[num_blocks], block_size, row_of, head_of, gen)
            hidden = model.model(inputs_embeds=task.embed[rows], attention_mask=mask, position_ids=positions)
            hidden = hidden.last_hidden_state[:, : targets.shape[1]]  # the xt half
            keep = targets >= 0
            logits = hidden[keep] @ task.head.T
            target = targets[keep]
            log_z = task.log_z(logits)
            token_nll = log_z - logits.gather(-1, target[:, None]).squeeze(-1)
            # <|im_end|>: target (1 - s) on itself, s spread over the other K-1 task rows.
            others = (log_z[:, None] - logits).sum(-1) - (log_z - logits[:, eos_row])
            smoothed = (1 - EOS_SMOOTHING) * token_nll + EOS_SMOOTHING * others / (K - 1)
            nll.append(torch.where(target == eos_row, smoothed, token_nll))
        loss = torch.cat(nll).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss_value = float(loss.detach())
    task.store(model)
    return loss_value


# ---------------------------------------------------------------------------------------------------------
# Checkpoint
# ---------------------------------------------------------------------------------------------------------
def build_trained_bd3lm_checkpoint(
    out_dir: str | os.PathLike, *, block_size: int = 32, steps: int = 1500, seed: int = 0
) -> Path:
    """Write the trained digits checkpoint (trained with ``block_size``) to ``out_dir``; cached across calls."""
    key = [_FORMAT_VERSION, block_size, steps, seed, SHAPE, DIGITS, EOS_SMOOTHING]
    return cached_build("bd3lm-digits", key, lambda tmp: _build(tmp, block_size=block_size, steps=steps, seed=seed),
                        out_dir)


def _build(out: Path, *, block_size: int, steps: int, seed: int) -> None:
    build_bd3lm_checkpoint(out, seed=seed, untied_lm_head=True, **SHAPE)
    with one_thread():
        torch.manual_seed(seed)
        model = blank_qwen2(out)
        with torch.no_grad():  # N(0, 1/fan_in) linear weights (see the module docstring)
            for module in model.model.layers.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.normal_(0.0, module.in_features**-0.5)
        start = time.process_time()
        loss = train(model, block_size=block_size, steps=steps, seed=seed)
        cpu_s = time.process_time() - start
    save_trained(model, out)
    info = {"digits": DIGITS, "block_size": block_size, "steps": steps,
            "seed": seed, "eos_smoothing": EOS_SMOOTHING, "final_loss": loss, "train_cpu_seconds": round(cpu_s, 1)}
    (out / "TRAINING.json").write_text(json.dumps(info, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------
# Quality check
# ---------------------------------------------------------------------------------------------------------
def evaluate(
    ckpt: str | os.PathLike,
    prompts: Sequence[str] | None = None,
    *,
    max_new_tokens: int = 32,
    steps: int | None = None,
    block_size: int = 32,
    model=None,
) -> dict:
    """Exact-match accuracy of the reference BD3LM decoder (the seed card's ``generate()``, greedy).

    ``steps`` defaults to ``max_new_tokens`` (the card's schedule: one token per step). A completion is
    right when its text up to the first ``<|im_end|>`` (decoded with ``AutoTokenizer.from_pretrained(ckpt)``,
    special tokens kept, so a leftover ``<|mask|>`` counts as wrong) equals :func:`answer_of` and it has an
    ``<|im_end|>``. Returns ``{"accuracy": {task: float, ..., "all": float}, "completions": [...]}``.
    Needs the repository's ``tests/reference`` (imported from the checkout this module lives in).
    """
    from transformers import AutoTokenizer

    repo = str(Path(__file__).resolve().parents[2])
    if repo not in sys.path:
        sys.path.insert(0, repo)
    from tests.reference import load_reference_model
    from tests.reference.bd3lm_reference import generate_bd3lm

    prompts = list(prompts) if prompts is not None else heldout_prompts(200)
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt), trust_remote_code=False)
    model = model if model is not None else load_reference_model(ckpt)
    right: dict[str, list[bool]] = {}
    completions = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        out = generate_bd3lm(model, ids, max_new_tokens=max_new_tokens, steps=steps or max_new_tokens,
                             block_size=block_size, eos_ids=(IM_END_ID,))
        text = tokenizer.decode(out[: out.index(IM_END_ID)] if IM_END_ID in out else out, skip_special_tokens=False)
        ok = IM_END_ID in out and text == answer_of(prompt)
        completions.append({"prompt": prompt, "text": text, "correct": ok})
        right.setdefault(task_of(prompt), []).append(ok)
        right.setdefault("all", []).append(ok)
    return {"accuracy": {k: sum(v) / len(v) for k, v in right.items()}, "completions": completions}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m vllm_blockdiff.testing.trained_bd3lm",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--evaluate", type=int, default=0, metavar="N",
                        help="then decode N held-out prompts with the reference decoder and print the accuracy")
    args = parser.parse_args(argv)
    path = build_trained_bd3lm_checkpoint(args.out, block_size=args.block_size, steps=args.steps, seed=args.seed)
    print(path)
    if args.evaluate:
        torch.set_num_threads(1)
        print(json.dumps(evaluate(path, heldout_prompts(args.evaluate), block_size=args.block_size)["accuracy"]))
    return path


if __name__ == "__main__":
    main()
