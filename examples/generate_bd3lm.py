"""Generate with a BD3LM checkpoint through vLLM (offline ``LLM`` API).

    python examples/generate_bd3lm.py --model /path/to/Qwen2.5-Coder-0.5B-Instruct-diffusion-bd3lm-v0.1
    python examples/generate_bd3lm.py            # builds a tiny random checkpoint first (no download)

Options are the seed card's: --max-tokens, --steps, --block-size, --temperature, --remasking.
"""

from __future__ import annotations

import argparse
import tempfile


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="checkpoint directory or hub id (default: a tiny random one)")
    ap.add_argument("--prompt", default="Implement a BFS traversal in Python with clear inline comments.")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=None, help="default: max tokens (the card's default)")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--remasking", choices=["low_confidence", "random"], default="low_confidence")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()

    model = args.model
    if model is None:
        from vllm_blockdiff.testing.tiny_checkpoints import build_bd3lm_checkpoint

        model = str(build_bd3lm_checkpoint(tempfile.mkdtemp(prefix="tiny-bd3lm-")))
        print(f"built a tiny random BD3LM checkpoint in {model} (its text is noise)")

    from vllm import LLM, SamplingParams

    llm = LLM(model=model, max_model_len=4096, kv_cache_memory_bytes=1 << 30)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        extra_args={
            "steps": args.steps or args.max_tokens,
            "block_size": args.block_size,
            "remasking": args.remasking,
        },
    )
    messages = [
        {"role": "system", "content": "You are a helpful AI assistant."},
        {"role": "user", "content": args.prompt},
    ]
    [out] = llm.chat([messages], params, use_tqdm=False)
    print(out.outputs[0].text)


if __name__ == "__main__":
    main()
