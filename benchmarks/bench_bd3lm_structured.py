"""What a grammar costs BD3LM: accuracy, tokens per forward and tokens/s of each commit rule, free and under
structured outputs (left-frontier commits, docs/design.md §15), on the trained digits model
(``vllm_blockdiff/testing/trained_bd3lm.py``). The grammar is ``[0-9]+``, which every right answer obeys, so
what changes is the rule's own cost: commits only from the leftmost mask, each run checked by xgrammar::

    python benchmarks/bench_bd3lm_structured.py --prompts 64

Prints a table (all requests of a row submitted together, greedy, ``max_tokens`` = ``steps`` = 32).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RULES = [("card", {}), ("τ=0.99", {"threshold": 0.99}), ("τ=0.9", {"threshold": 0.9}),
         ("τ=0.7", {"threshold": 0.7}), ("τ=0.5", {"threshold": 0.5}), ("f=1", {"factor": 1.0})]
IM_END = 151645


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import torch
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from vllm_blockdiff.testing.tiny_checkpoints import cache_dir
    from vllm_blockdiff.testing.trained_bd3lm import answer_of, build_trained_bd3lm_checkpoint, heldout_prompts

    if args.device == "cpu":
        torch.set_num_threads(1)
    ckpt = build_trained_bd3lm_checkpoint(cache_dir() / "bench-bd3lm-digits")
    memory = {"kv_cache_memory_bytes": 1 << 30} if args.device == "cpu" else {"gpu_memory_utilization": 0.3}
    llm = LLM(model=str(ckpt), dtype="float32", max_model_len=512, enforce_eager=args.device == "cpu", seed=0,
              max_num_seqs=args.prompts, **memory)
    tokenizer = llm.get_tokenizer()
    prompts = heldout_prompts(args.prompts)
    print(f"trained digits model, {len(prompts)} held-out prompts submitted together, greedy, "
          f"max_tokens = steps = {args.max_tokens}, grammar [0-9]+")
    print("| rule | free: accuracy | tokens/forward | tok/s | grammar: accuracy | tokens/forward | tok/s | "
          "outputs matching |\n|---|---|---|---|---|---|---|---|")
    for name, extra in RULES:
        cells = []
        for structured in (None, StructuredOutputsParams(regex="[0-9]+")):
            params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, structured_outputs=structured,
                                    extra_args={"steps": args.max_tokens, **extra})
            llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up (compiles the grammar once)
            start = time.perf_counter()
            outs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
            elapsed = time.perf_counter() - start
            right = matching = tokens = forwards = 0
            for prompt, out in zip(prompts, outs):
                ids = list(out.token_ids)
                text = tokenizer.decode(ids[: ids.index(IM_END)] if IM_END in ids else ids)
                right += IM_END in ids and text == answer_of(prompt)
                matching += bool(re.fullmatch("[0-9]+", out.text))
                tokens += len(ids)
                forwards += sum(out.spec_decode_metrics.histogram)
            cells += [f"{right / len(prompts):.3f}", f"{tokens / forwards:.2f}", f"{tokens / elapsed:.1f}"]
            if structured is not None:
                cells.append(f"{matching}/{len(prompts)}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
