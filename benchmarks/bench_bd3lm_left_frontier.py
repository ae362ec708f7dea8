"""Evidence for how BD3LM treats structured outputs: what a *left-frontier* commit rule would cost.

A grammar checks tokens left to right, so the only sound way to enforce one on a BD3LM block is to commit
from the first masked position only: each step commits the longest run of masked positions, starting at the
leftmost, whose confidence exceeds τ (at least that first one, which the grammar's bitmask would constrain).
This script measures that rule with a grammar that accepts everything the model writes (so the numbers are
the rule's own cost, an upper bound for any real grammar), against the plugin's threshold rule at the same
τ, on the trained digits model (``vllm_blockdiff/testing/trained_bd3lm.py``) with the reference decoder
(``tests/reference/bd3lm_reference.py``; the frontier rule exists only here, not in the plugin)::

    python benchmarks/bench_bd3lm_left_frontier.py --prompts 64

Prints accuracy and output tokens per forward of each rule.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def frontier_step(logits, chunk, num_commit, *, temperature, remasking, mask_id, generator, threshold=None,
                  factor=None, rules=None, prefix=()):
    """Greedy left-frontier commit (the reference's ``commit_step`` signature)."""
    import torch

    assert temperature == 0 and remasking == "low_confidence" and rules is None and factor is None
    logits = logits.float()
    x0 = logits.argmax(dim=-1)
    conf = torch.softmax(logits, dim=-1).gather(-1, x0[:, None]).squeeze(-1)
    out = chunk.clone()
    for k, i in enumerate((chunk == mask_id).nonzero().flatten().tolist()):
        if k > 0 and not conf[i] > threshold:
            break
        out[i] = x0[i]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.99, 0.9, 0.7, 0.5])
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from tests.reference import bd3lm_reference, load_reference_model
    from vllm_blockdiff.testing.tiny_checkpoints import IM_END_ID, cache_dir
    from vllm_blockdiff.testing.trained_bd3lm import answer_of, build_trained_bd3lm_checkpoint, heldout_prompts

    torch.set_num_threads(1)
    ckpt = build_trained_bd3lm_checkpoint(cache_dir() / "bench-bd3lm-digits")
    model = load_reference_model(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt), trust_remote_code=False)
    prompts = heldout_prompts(args.prompts)
    plain_step = bd3lm_reference.commit_step

    def run(step, threshold):
        bd3lm_reference.commit_step = step
        try:
            right = tokens = forwards = 0
            for prompt in prompts:
                count: list[int] = []
                ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
                out = bd3lm_reference.generate_bd3lm(model, ids, max_new_tokens=args.max_tokens,
                                                     steps=args.max_tokens, eos_ids=(IM_END_ID,),
                                                     threshold=threshold, forwards=count)
                out = out[: out.index(IM_END_ID) + 1] if IM_END_ID in out else out
                right += IM_END_ID in out and tokenizer.decode(out[:-1]) == answer_of(prompt)
                tokens += len(out)
                forwards += count[0]
            return right / len(prompts), tokens / forwards
        finally:
            bd3lm_reference.commit_step = plain_step

    print(f"trained digits model, {len(prompts)} held-out prompts, max_tokens = steps = {args.max_tokens}, greedy")
    print("| τ | threshold rule: accuracy | tokens/forward | left frontier: accuracy | tokens/forward |")
    print("|---|---|---|---|---|")
    for tau in args.thresholds:
        acc, tpf = run(plain_step, tau)
        f_acc, f_tpf = run(frontier_step, tau)
        print(f"| {tau} | {acc:.3f} | {tpf:.2f} | {f_acc:.3f} | {f_tpf:.2f} |", flush=True)


if __name__ == "__main__":
    main()
