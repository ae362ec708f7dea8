"""Generate with an SDLM checkpoint through vLLM (offline ``LLM`` API), as the SDLM card does.

    python examples/generate_sdlm.py --model /path/to/SDLM-3B-D4 --threshold 0.5
    python examples/generate_sdlm.py       # no checkpoint at hand: the tiny model trained on letter
                                           # patterns (about a minute on CPU the first time)

Options are the card's ``SDLM_generate`` arguments: --max-tokens (``max_gen_len``), --temperature,
--top-p, --top-k, --threshold, --alg (prob_conf | entropy_conf | self_speculative); the window
D (``n_future_tokens``) is the checkpoint's ``block_size``. Prints the text and the tokens
committed per forward.
"""

from __future__ import annotations

import argparse
import tempfile


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="checkpoint directory or hub id (default: the tiny trained letters model)")
    ap.add_argument("--prompt", default="Write a Fibonacci function in Python.")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--alg", choices=["prob_conf", "entropy_conf", "self_speculative"], default="prob_conf")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()

    model, prompt = args.model, args.prompt
    if model is None:
        from vllm_blockdiff.testing.trained_sdlm import build_trained_sdlm_checkpoint

        model = str(build_trained_sdlm_checkpoint(tempfile.mkdtemp(prefix="sdlm-letters-")))
        prompt = " a c e g i k m o q s u w y a c e g"  # the letters model continues letter patterns
        print(f"built the tiny letters SDLM checkpoint in {model}")

    from vllm import LLM, SamplingParams

    llm = LLM(model=model, max_model_len=4096, kv_cache_memory_bytes=1 << 30)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        extra_args={"alg": args.alg, "threshold": args.threshold},
    )
    if args.model is None:
        [out] = llm.generate([prompt], params, use_tqdm=False)
    else:
        messages = [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": prompt},
        ]
        [out] = llm.chat([messages], params, use_tqdm=False)
    completion = out.outputs[0]
    print(completion.text)
    metrics = completion.spec_decode_metrics.to_dict()
    print(f"\n{len(completion.token_ids)} tokens in {sum(metrics['acceptance_histogram'])} forwards: "
          f"{metrics['mean_acceptance_length']:.2f} tokens per forward")


if __name__ == "__main__":
    main()
