"""Quality against speed of BD3LM's commit rules on a model that is actually confident.

The tiny BD3LM trained on digit tasks (``vllm_blockdiff/testing/trained_bd3lm.py``: copy and sort, answers
fully determined by the prompt) answers held-out prompts through the engine under each rule: the card's
schedule (one token per step), ``threshold`` τ and ``factor`` f. Per rule: exact-match accuracy,
output tokens per forward (completion tokens / denoising forwards), tokens/s with 1 request at a time and
with 32 concurrent requests; and vLLM's AR decoding of the same backbone (the same weights loaded as
``Qwen2ForCausalLM``, producing as many tokens) for reference. Prints a table, writes a JSON of the rows and
a plot::

    python benchmarks/bench_bd3lm_parallel.py --prompts 64 --plot benchmarks/results/bd3lm_parallel.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RULES = [("card", {}), ("τ=0.99", {"threshold": 0.99}), ("τ=0.95", {"threshold": 0.95}),
         ("τ=0.9", {"threshold": 0.9}), ("τ=0.8", {"threshold": 0.8}), ("τ=0.7", {"threshold": 0.7}),
         ("τ=0.5", {"threshold": 0.5}), ("f=0.5", {"factor": 0.5}), ("f=1", {"factor": 1.0}),
         ("f=2", {"factor": 2.0}), ("f=4", {"factor": 4.0})]
IM_END = 151645


def _ar_copy(ckpt: Path) -> Path:
    """The trained weights as vLLM's own Qwen2 (AR decoding of the same backbone, for speed only)."""
    out = ckpt.parent / (ckpt.name + "-as-qwen2")
    if not (out / "config.json").exists():
        shutil.copytree(ckpt, out, dirs_exist_ok=True)
        config = json.loads((out / "config.json").read_text())
        config.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
        config.pop("auto_map", None)
        (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def _llm(ckpt: Path, device: str, concurrency: int):
    from vllm import LLM

    memory = {"kv_cache_memory_bytes": 1 << 30} if device == "cpu" else {"gpu_memory_utilization": 0.3}
    return LLM(model=str(ckpt), dtype="float32", max_model_len=512, enforce_eager=device == "cpu", seed=0,
               max_num_seqs=concurrency, **memory)


def _timed(llm, prompts, params, concurrency: int):
    """(outputs, tokens/s): one request at a time when concurrency is 1, else all submitted together."""
    start = time.perf_counter()
    if concurrency == 1:
        outs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
    else:
        outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return outs, sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64, help="held-out prompts per rule (32 concurrent)")
    ap.add_argument("--serial-prompts", type=int, default=16, help="of those, run one at a time")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--plot", default=None, help="write a PNG here")
    ap.add_argument("--replot", default=None, metavar="JSON", help="only redraw the plot from a --json file")
    args = ap.parse_args()
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        _plot(saved["rules"], saved["ar"]["tok_s_1"], saved["ar"]["tok_s_32"], Path(args.plot))
        return

    import torch
    from vllm import SamplingParams

    from vllm_blockdiff.testing.tiny_checkpoints import cache_dir
    from vllm_blockdiff.testing.trained_bd3lm import answer_of, build_trained_bd3lm_checkpoint, heldout_prompts

    if args.device == "cpu":
        torch.set_num_threads(1)
    ckpt = build_trained_bd3lm_checkpoint(cache_dir() / "bench-bd3lm-digits")
    prompts = heldout_prompts(args.prompts)
    rows = []
    llm = _llm(ckpt, args.device, 32)
    tokenizer = llm.get_tokenizer()
    for name, extra in RULES:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                                extra_args={"steps": args.max_tokens, **extra})
        llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
        _, serial_tps = _timed(llm, prompts[: args.serial_prompts], params, 1)
        outs, batch_tps = _timed(llm, prompts, params, 32)
        correct, tokens, forwards = 0, 0, 0
        for prompt, out in zip(prompts, outs):
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            text = tokenizer.decode(ids[: ids.index(IM_END)] if IM_END in ids else ids, skip_special_tokens=False)
            correct += IM_END in ids and text == answer_of(prompt)
            tokens += len(ids)
            forwards += sum(completion.spec_decode_metrics.histogram)
        rows.append({"rule": name, **extra, "accuracy": correct / len(prompts), "tokens_per_forward": tokens / forwards,
                     "tok_s_1": serial_tps, "tok_s_32": batch_tps})
        print(f"{name:7} accuracy {rows[-1]['accuracy']:.3f}  tokens/forward {rows[-1]['tokens_per_forward']:.2f}  "
              f"tok/s 1 req {serial_tps:7.1f}  32 req {batch_tps:7.1f}", flush=True)
    llm.llm_engine.engine_core.shutdown()
    del llm

    # vLLM AR decoding of the same backbone: as many tokens as an answer has on average (digits are single
    # tokens) plus its <|im_end|>.
    ar_tokens = round(sum(len(answer_of(p)) for p in prompts) / len(prompts)) + 1
    ar = _llm(_ar_copy(ckpt), args.device, 32)
    ar_params = SamplingParams(max_tokens=ar_tokens, temperature=0.0, ignore_eos=True)
    ar.generate(prompts[:2], ar_params, use_tqdm=False)
    _, ar_1 = _timed(ar, prompts[: args.serial_prompts], ar_params, 1)
    _, ar_32 = _timed(ar, prompts, ar_params, 32)
    ar.llm_engine.engine_core.shutdown()
    print(f"\nAR (same backbone, {ar_tokens} tokens each): tok/s 1 req {ar_1:.1f}  32 req {ar_32:.1f}")

    print("\n| rule | accuracy | tokens/forward | tok/s, 1 request | tok/s, 32 requests |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rule']} | {r['accuracy']:.3f} | {r['tokens_per_forward']:.2f} | {r['tok_s_1']:.1f} | "
              f"{r['tok_s_32']:.1f} |")
    print(f"| vLLM AR (same backbone) | – | 1.00 | {ar_1:.1f} | {ar_32:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rules": rows, "ar": {"tok_s_1": ar_1, "tok_s_32": ar_32},
                                               "prompts": len(prompts), "device": args.device}, indent=2))
    if args.plot:
        _plot(rows, ar_1, ar_32, Path(args.plot))


def _plot(rows, ar_1: float, ar_32: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    # One line per rule family (τ, f), ordered by parallelism.
    for family, marker in (("τ", "o"), ("f", "^")):
        points = sorted((r for r in rows if r["rule"].startswith(family)), key=lambda r: r["tokens_per_forward"])
        left.plot([r["tokens_per_forward"] for r in points], [r["accuracy"] for r in points], marker=marker,
                  label=f"{family} rules")
        for r in points[:: max(1, len(points) - 1)]:  # the ends of each line (the table has every rule)
            left.annotate(r["rule"], (r["tokens_per_forward"], r["accuracy"]), textcoords="offset points",
                          xytext=(4, -12 if family == "τ" else 6), fontsize=7)
    for r in rows:
        if r["rule"] == "card":
            left.scatter(r["tokens_per_forward"], r["accuracy"], marker="s", color="k", label="card schedule")
    left.set_ylim(0, 1.05)
    left.legend(fontsize=7, loc="lower right")
    left.set_xlabel("output tokens per forward")
    left.set_ylabel("exact-match accuracy (held-out prompts)")
    left.set_title("quality vs parallelism")
    left.grid(alpha=0.3)
    names = [r["rule"] for r in rows]
    x = range(len(rows))
    right.bar([i - 0.2 for i in x], [r["tok_s_1"] for r in rows], width=0.4, label="1 request")
    right.bar([i + 0.2 for i in x], [r["tok_s_32"] for r in rows], width=0.4, label="32 requests")
    right.axhline(ar_1, color="C0", linestyle="--", linewidth=1, label="vLLM AR, 1 request")
    right.axhline(ar_32, color="C1", linestyle="--", linewidth=1, label="vLLM AR, 32 requests")
    right.set_xticks(list(x), names, rotation=45, fontsize=8)
    right.set_ylabel("tokens/s")
    right.set_title("throughput")
    right.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
