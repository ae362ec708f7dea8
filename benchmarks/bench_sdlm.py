"""SDLM throughput: the reference decoder vs the vllm_blockdiff engine vs vLLM's AR decoding of the
same backbone. Same prompts, one process; prints generated tokens/s, tokens per forward and ratios.

    python benchmarks/bench_sdlm.py                                  # trained letters model, D=4
    python benchmarks/bench_sdlm.py --model letters --threshold 0.9 --concurrency 1 32
    python benchmarks/bench_sdlm.py --model qwen2.5-0.5b --threshold 0.0   # random weights: D per window

- reference: ``tests/reference/sdlm_reference.generate_sdlm(impl="cached")``, SDLM's own loop (KV
  cache, window cropped off after each step); batch 1 as SDLM, so requests run one after another.
- vllm_blockdiff: ``LLM(model=ckpt)`` with the plugin (SDLM windows, ``alg``/``threshold``).
- vLLM AR: the same checkpoint loaded as plain ``Qwen2ForCausalLM`` (``hf_overrides``), greedy
  next-token decoding: the baseline SDLM claims to beat ("about 2x faster than AR").
Tokens per forward = committed tokens / windows (vLLM's per-request spec-decode metrics).
"letters" is the tiny checkpoint trained on letter patterns (``vllm_blockdiff.testing.trained_sdlm``):
the one model here whose windows are confidently right, so its tokens per forward are meaningful;
random-weight shapes are for cost at a fixed commit rate (threshold 0: D tokens per window).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_checkpoint(model: str, D: int, dtype: str) -> Path:
    import torch

    from vllm_blockdiff.testing.tiny_checkpoints import (
        build_sdlm_checkpoint,
        cache_dir,
        qwen25_05b_shape,
        qwen25_3b_shape,
    )

    if model == "letters":
        from vllm_blockdiff.testing.trained_sdlm import build_trained_sdlm_checkpoint

        return build_trained_sdlm_checkpoint(cache_dir() / f"bench-sdlm-letters-D{D}", D=D)
    out = cache_dir() / f"bench-sdlm-{model}-D{D}-{dtype}"
    if not (out / "config.json").exists():
        shape = {"tiny": dict, "qwen2.5-0.5b": qwen25_05b_shape, "qwen2.5-3b": qwen25_3b_shape}[model]()
        build_sdlm_checkpoint(out, D=D, dtype=getattr(torch, dtype), **shape)
    return out


def make_prompts(model: str, n: int, length: int, rng: random.Random) -> list[list[int]]:
    if model == "letters":
        from vllm_blockdiff.testing.trained_sdlm import letter_ids, sample_text

        ids = letter_ids()
        return [[ids[i] for i in sample_text(rng, length)] for _ in range(n)]
    return [[rng.randrange(0, 151643) for _ in range(length)] for _ in range(n)]


def timed_generate(llm, prompts, params):
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - t0, [o.outputs[0] for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["letters", "tiny", "qwen2.5-0.5b", "qwen2.5-3b"], default="letters")
    ap.add_argument("--block-size", type=int, default=4, help="the window D")
    ap.add_argument("--alg", default="prob_conf")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES", "") != "" else "cpu")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--skip-reference", action="store_true", help="engines only (the reference is slow)")
    args = ap.parse_args()

    import torch
    from vllm import LLM, SamplingParams

    from tests.reference import load_reference_model
    from tests.reference.sdlm_reference import generate_sdlm

    device = "cuda" if torch.cuda.is_available() and args.device == "cuda" else "cpu"
    D = args.block_size
    ckpt = build_checkpoint(args.model, D, args.dtype)
    rng = random.Random(0)
    workloads = {c: make_prompts(args.model, c, args.prompt_len, rng) for c in args.concurrency}
    engine_args = dict(
        dtype=args.dtype,
        max_model_len=max(1024, args.prompt_len + args.new_tokens + 64),
        enforce_eager=args.enforce_eager,
        seed=0,
    )
    if device == "cpu":
        engine_args["kv_cache_memory_bytes"] = 1 << 30
    else:
        engine_args["gpu_memory_utilization"] = 0.5
    ours = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True,
                          extra_args={"alg": args.alg, "threshold": args.threshold})
    ar = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)

    results: dict[int, dict] = {c: {} for c in args.concurrency}

    def run_engine(name, params, **kwargs):
        llm = LLM(model=str(ckpt), **engine_args, **kwargs)
        llm.generate([{"prompt_token_ids": [1] * args.prompt_len}], params, use_tqdm=False)  # warm up
        for conc, prompts in workloads.items():
            seconds, completions = timed_generate(llm, prompts, params)
            results[conc][name] = (seconds, completions)
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()

    run_engine("ours", ours)
    run_engine("ar", ar, hf_overrides={"architectures": ["Qwen2ForCausalLM"]})

    if not args.skip_reference:
        if device == "cpu":
            torch.set_num_threads(1)  # vLLM's CPU worker runs on one core; match it
        model = load_reference_model(ckpt, dtype=getattr(torch, args.dtype), attn_implementation="sdpa",
                                     device=device)
        for conc, prompts in workloads.items():
            t0 = time.perf_counter()
            outs = [generate_sdlm(model, p, max_new_tokens=args.new_tokens, D=D, threshold=args.threshold,
                                  alg=args.alg, eos_ids=(), impl="cached") for p in prompts]
            if device == "cuda":
                torch.cuda.synchronize()
            results[conc]["ref"] = (time.perf_counter() - t0, outs)

    print(f"model={args.model} D={D} alg={args.alg} threshold={args.threshold} device={device} "
          f"dtype={args.dtype} prompt={args.prompt_len} new_tokens={args.new_tokens} eager={args.enforce_eager}")
    print(f"{'requests':>8} {'reference tok/s':>16} {'ours tok/s':>11} {'vLLM AR tok/s':>14} "
          f"{'tok/forward':>12} {'ours/ref':>9} {'ours/AR':>8} {'same as ref':>12}")
    for conc in args.concurrency:
        n_tokens = conc * args.new_tokens
        ours_s, ours_out = results[conc]["ours"]
        ar_s, _ = results[conc]["ar"]
        windows = sum(sum(c.spec_decode_metrics.histogram) for c in ours_out)
        per_forward = sum(len(c.token_ids) for c in ours_out) / windows
        if "ref" in results[conc]:
            ref_s, ref_out = results[conc]["ref"]
            ref_tps = f"{n_tokens / ref_s:16.1f}"
            ratio_ref = f"{ref_s / ours_s:8.2f}x"
            same = sum(list(c.token_ids) == r[0] for c, r in zip(ours_out, ref_out))
            same_col = f"{same:>6}/{conc:<5}"
        else:
            ref_tps, ratio_ref, same_col = f"{'-':>16}", f"{'-':>9}", f"{'-':>12}"
        print(f"{conc:>8} {ref_tps} {n_tokens / ours_s:11.1f} {n_tokens / ar_s:14.1f} {per_forward:12.2f} "
              f"{ratio_ref} {ar_s / ours_s:7.2f}x {same_col}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
