"""What a grammar costs SDLM: tokens per forward and tokens/s with and without structured outputs.

The trained letters model (``vllm_blockdiff.testing.trained_sdlm``, D=4) continues letter patterns; each
prompt is decoded greedily (``prob_conf``, threshold τ) free and under regexes:

- ``letters``: ``( [a-z])+`` — every output the model would write anyway: the grammar's cost alone
  (bitmask per step, the run checked token by token), tokens per forward should not move;
- ``vowels``: ``( [aeiou])+`` — the grammar disagrees with the model: row 0 is forced, the run is cut at the
  first rejected token, so tokens per forward fall towards 1.

One process, the same prompts for each; prints a table::

    python benchmarks/bench_sdlm_structured.py --concurrency 1 32
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GRAMMARS = {"none": None, "letters": r"( [a-z])+", "vowels": r"( [aeiou])+"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from vllm_blockdiff.testing.tiny_checkpoints import cache_dir
    from vllm_blockdiff.testing.trained_sdlm import build_trained_sdlm_checkpoint, letter_ids, sample_text

    ckpt = build_trained_sdlm_checkpoint(cache_dir() / "bench-sdlm-letters-D4", D=4)
    memory = {"kv_cache_memory_bytes": 1 << 30} if args.device == "cpu" else {"gpu_memory_utilization": 0.3}
    llm = LLM(model=str(ckpt), dtype="float32", max_model_len=1024, enforce_eager=args.device == "cpu", seed=0,
              max_num_seqs=max(args.concurrency), **memory)
    ids, rng = letter_ids(), random.Random(0)
    print(f"letters model D=4, prob_conf τ={args.threshold}, prompt {args.prompt_len}, {args.new_tokens} tokens "
          f"(ignore_eos), greedy")
    print("| grammar | requests | tokens/forward | tok/s | outputs matching the grammar |\n|---|---|---|---|---|")
    for concurrency in args.concurrency:
        prompts = [{"prompt_token_ids": [ids[i] for i in sample_text(rng, args.prompt_len)]}
                   for _ in range(concurrency)]
        for name, regex in GRAMMARS.items():
            params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True,
                                    structured_outputs=StructuredOutputsParams(regex=regex) if regex else None,
                                    extra_args={"threshold": args.threshold})
            llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up (compiles the grammar once)
            start = time.perf_counter()
            outs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
            elapsed = time.perf_counter() - start
            tokens = sum(len(o.token_ids) for o in outs)
            forwards = sum(sum(o.spec_decode_metrics.histogram) for o in outs)
            matching = sum(bool(re.fullmatch(regex or r"( [a-z])+", o.text)) for o in outs)
            print(f"| {name} `{regex or '-'}` | {concurrency} | {tokens / forwards:.2f} | {tokens / elapsed:.1f} | "
                  f"{matching}/{len(outs)} |", flush=True)
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
