"""BD3LM throughput: the seed card's algorithm on plain transformers vs the vllm_blockdiff engine.

Same prompts, same options, one process; prints generated tokens/s of each and the ratio at each
concurrency, and checks the outputs are identical (greedy). Example (CPU):

    python benchmarks/bench_bd3lm.py --shape tiny --concurrency 1 32
    python benchmarks/bench_bd3lm.py --shape qwen2.5-0.5b --concurrency 1 32 --new-tokens 32 --steps 16

The baseline is ``tests/reference/bd3lm_reference.generate_bd3lm_batch`` (the card's loop: a prefix
pass per block, one chunk forward per step; its batch path needs equal-length prompts, so all
prompts here have the same length).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_checkpoint(shape: str, dtype: str) -> Path:
    import torch

    from vllm_blockdiff.testing.tiny_checkpoints import build_bd3lm_checkpoint, cache_dir, qwen25_05b_shape

    out = cache_dir() / f"bench-bd3lm-{shape}-{dtype}"
    if not (out / "config.json").exists():
        kwargs = qwen25_05b_shape() if shape == "qwen2.5-0.5b" else {}
        build_bd3lm_checkpoint(out, dtype=getattr(torch, dtype), **kwargs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["tiny", "qwen2.5-0.5b"], default="tiny")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=None, help="default: new tokens (the card's default)")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES", "") != "" else "cpu")
    ap.add_argument("--enforce-eager", action="store_true")
    args = ap.parse_args()
    steps = args.steps or args.new_tokens
    if os.environ.get("BENCH_TRACEBACK_EVERY"):
        import faulthandler  # where a stuck start-up is stuck

        faulthandler.dump_traceback_later(int(os.environ["BENCH_TRACEBACK_EVERY"]), repeat=True)

    import torch
    from vllm import LLM, SamplingParams

    from tests.reference import load_reference_model
    from tests.reference.bd3lm_reference import generate_bd3lm_batch

    device = "cuda" if torch.cuda.is_available() and args.device == "cuda" else "cpu"
    ckpt = build_checkpoint(args.shape, args.dtype)
    llm = LLM(
        model=str(ckpt),
        dtype=args.dtype,
        max_model_len=max(1024, args.prompt_len + args.new_tokens + 64),
        # CPU: explicit KV bytes (the utilisation fraction is relative to a NUMA node, not the box).
        **({"kv_cache_memory_bytes": 1 << 30} if device == "cpu" else {"gpu_memory_utilization": 0.5}),
        enforce_eager=args.enforce_eager,
        seed=0,
    )
    if device == "cpu":
        # vLLM's CPU worker runs on one core (the other is left to the engine loop); match it.
        torch.set_num_threads(1)
    model = load_reference_model(ckpt, dtype=getattr(torch, args.dtype), attn_implementation="sdpa", device=device)
    params = SamplingParams(
        max_tokens=args.new_tokens,
        temperature=0.0,
        ignore_eos=True,
        extra_args={"steps": steps, "block_size": args.block_size},
    )
    rng = random.Random(0)
    llm.generate([{"prompt_token_ids": [1] * args.prompt_len}], params, use_tqdm=False)  # warm up

    print(
        f"shape={args.shape} device={device} dtype={args.dtype} prompt={args.prompt_len} "
        f"new_tokens={args.new_tokens} steps={steps} block={args.block_size}"
    )
    print(f"{'concurrency':>11} {'reference tok/s':>16} {'vllm_blockdiff tok/s':>21} {'ratio':>7} {'same output':>12}")
    for conc in args.concurrency:
        prompts = [[rng.randrange(0, 151643) for _ in range(args.prompt_len)] for _ in range(conc)]

        t0 = time.perf_counter()
        ref = generate_bd3lm_batch(
            model, prompts, max_new_tokens=args.new_tokens, steps=steps, block_size=args.block_size, eos_ids=()
        )
        if device == "cuda":
            torch.cuda.synchronize()
        ref_time = time.perf_counter() - t0

        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        eng_time = time.perf_counter() - t0
        ours = [list(o.outputs[0].token_ids) for o in outs]

        n_tokens = conc * args.new_tokens
        ref_tps, eng_tps = n_tokens / ref_time, n_tokens / eng_time
        same = sum(a == b for a, b in zip(ref, ours))
        print(f"{conc:>11} {ref_tps:>16.2f} {eng_tps:>21.2f} {eng_tps / ref_tps:>6.2f}x {same:>6}/{conc:<5}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
