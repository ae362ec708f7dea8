"""The engine's own cost of a diffusion step against an AR decode step, on a model whose compute is negligible.

A tiny model (vocab 1024, hidden 64, 2 layers by default) makes what is timed the engine's work per step:
scheduling, input preparation, the attention plan, decoding. Per family and concurrency, one process,
eager, best of ``--repeats``:

- BD3LM: prompt 32, 64 new tokens, block 32, ``steps`` = tokens (one token per denoising step);
- SDLM: the same prompt and length, ``threshold`` 2 (one token per window);
- AR: vLLM's own decoding of the same weights loaded as ``Qwen2ForCausalLM``.

Prints ms per engine step of each and the ratio to AR, and with ``--profile N`` the top functions of a
cProfile of the diffusion run at N requests (where the remaining host time goes)::

    python benchmarks/bench_hotpath.py --concurrency 1 8 32 64 --profile 32
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the scheduler is in this process: count steps

MASK_ID = 1000  # inside the small vocabulary


def build_checkpoints(args) -> dict[str, Path]:
    from vllm_blockdiff.testing.tiny_checkpoints import build_bd3lm_checkpoint, build_sdlm_checkpoint, cache_dir

    shape = dict(hidden=args.hidden, layers=args.layers, heads=2, kv_heads=1, intermediate=4 * args.hidden)
    root = cache_dir() / f"bench-hotpath-v{args.vocab}-h{args.hidden}-l{args.layers}"
    out = {}
    bd3lm = root / "bd3lm"
    if not (bd3lm / "config.json").exists():
        build_bd3lm_checkpoint(bd3lm, vocab_size=args.vocab, mask_token_id=MASK_ID, **shape)
    out["bd3lm"] = bd3lm
    sdlm = root / "sdlm"
    if not (sdlm / "config.json").exists():
        build_sdlm_checkpoint(sdlm, D=4, vocab_size=args.vocab, mask_token_id=MASK_ID, **shape)
    out["sdlm"] = sdlm
    ar = root / "ar"
    if not (ar / "config.json").exists():  # the BD3LM weights as vLLM's own Qwen2
        import shutil

        shutil.copytree(bd3lm, ar)
        config = json.loads((ar / "config.json").read_text())
        config.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
        config.pop("auto_map", None)
        config.pop("mask_token_id", None)
        (ar / "config.json").write_text(json.dumps(config, indent=2))
    out["ar"] = ar
    return out


def _params(family: str, args):
    from vllm import SamplingParams

    extra = None
    if family == "bd3lm":
        extra = {"steps": args.new_tokens, "block_size": args.block_size}
    elif family == "sdlm":
        extra = {"threshold": 2.0}
    return SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True, extra_args=extra)


def measure(ckpt: Path, family: str, args, profile_at: int | None):
    from vllm import LLM

    llm = LLM(model=str(ckpt), dtype="float32", max_model_len=512, kv_cache_memory_bytes=512 << 20,
              enforce_eager=True, seed=0, max_num_seqs=max(args.concurrency))
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    steps = [0]
    schedule = scheduler.schedule

    def counting_schedule(*a, **kw):
        out = schedule(*a, **kw)
        steps[0] += bool(out.num_scheduled_tokens)
        return out

    scheduler.schedule = counting_schedule
    rng = random.Random(0)
    results, profile_text = {}, None
    try:
        for n in args.concurrency:
            prompts = [{"prompt_token_ids": [rng.randrange(0, MASK_ID) for _ in range(args.prompt_len)]}
                       for _ in range(n)]
            params = _params(family, args)
            llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up
            best = None
            for _ in range(args.repeats):
                steps[0] = 0
                start = time.perf_counter()
                outs = llm.generate(prompts, params, use_tqdm=False)
                elapsed = time.perf_counter() - start
                assert all(len(o.outputs[0].token_ids) == args.new_tokens for o in outs)
                per_step = elapsed / steps[0] * 1000
                best = per_step if best is None else min(best, per_step)
            results[n] = (best, steps[0])
            if profile_at == n:
                profiler = cProfile.Profile()
                profiler.enable()
                llm.generate(prompts, params, use_tqdm=False)
                profiler.disable()
                buffer = io.StringIO()
                pstats.Stats(profiler, stream=buffer).sort_stats("tottime").print_stats(18)
                profile_text = buffer.getvalue()
    finally:
        llm.llm_engine.engine_core.shutdown()
    return results, profile_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--families", nargs="+", default=["bd3lm", "sdlm"], choices=["bd3lm", "sdlm"])
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", type=int, default=None, help="cProfile the diffusion run at this concurrency")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    ckpts = build_checkpoints(args)
    ar, _ = measure(ckpts["ar"], "ar", args, None)
    rows = []
    profiles = {}
    for family in args.families:
        ours, profile = measure(ckpts[family], family, args, args.profile)
        profiles[family] = profile
        for n in args.concurrency:
            rows.append((family, n, ours[n][0], ar[n][0], ours[n][0] / ar[n][0], ours[n][1], ar[n][1]))
    print(f"\nvocab {args.vocab}, hidden {args.hidden}, {args.layers} layers; prompt {args.prompt_len}, "
          f"{args.new_tokens} tokens, block {args.block_size}, one token per step; eager, best of {args.repeats}")
    print(f"{'family':7} {'requests':>8} {'ms/step':>9} {'AR ms/step':>11} {'ratio':>6} {'steps':>6} {'AR steps':>8}")
    for family, n, ours_ms, ar_ms, ratio, steps, ar_steps in rows:
        print(f"{family:7} {n:8d} {ours_ms:9.2f} {ar_ms:11.2f} {ratio:6.2f} {steps:6d} {ar_steps:8d}")
    for family, profile in profiles.items():
        if profile:
            print(f"\n--- {family} at {args.profile} requests: top functions by own time ---")
            print("\n".join(profile.splitlines()[:40]))


if __name__ == "__main__":
    main()
