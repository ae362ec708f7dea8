"""Watch a block-diffusion model write: a chat client that redraws the block being denoised.

Against a running ``vllm serve`` of a BD3LM or SDLM checkpoint:

    python examples/visualize_denoising.py "Write a BFS in Python." --steps 32 --block-size 32   # BD3LM
    python examples/visualize_denoising.py " a c e g i k" --completion --threshold 0.9         # SDLM

It streams a chat completion (or a plain completion with ``--completion``) with the documented
``vllm_xargs: {"trace": true}`` option: besides the text, every engine step arrives as a frame
(``choices[0].blockdiff_trace``, see ``vllm_blockdiff/serving_trace.py``). The screen shows the
text committed so far followed by the frame: for BD3LM the block with its still-masked slots as
``░``, for SDLM the window with the accepted prefix underlined and the rejected guesses dimmed.
"""

from __future__ import annotations

import argparse
import sys
import time

MASK_GLYPH = "░"
CLEAR, HOME = "\x1b[2J", "\x1b[H"
BOLD, DIM, UNDERLINE, RESET = "\x1b[1m", "\x1b[2m", "\x1b[4m", "\x1b[0m"


def printable(text: str) -> str:
    """Control characters other than newline shown escaped, so a frame never moves the cursor."""
    return "".join(c if c == "\n" or c.isprintable() else repr(c)[1:-1] for c in text)


def draw(out, header: str, committed: str, frame: dict | None, color: bool) -> None:
    bold, dim, under, reset = (BOLD, DIM, UNDERLINE, RESET) if color else ("", "", "", "")
    parts = [printable(committed)]
    if frame is not None:
        if frame["kind"] == "bd3lm":
            parts += [bold + (MASK_GLYPH if t is None else printable(t)) + reset for t in frame["tokens"]]
        else:
            accepted = frame.get("accepted", 0)
            parts += [(under if i < accepted else dim) + printable(t) + reset for i, t in enumerate(frame["tokens"])]
    out.write(CLEAR + HOME + header + "\n\n" + "".join(parts) + "\n")
    out.flush()


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompt")
    ap.add_argument("--base-url", default="http://localhost:8000/v1")
    ap.add_argument("--model", help="default: the server's first model")
    ap.add_argument("--completion", action="store_true", help="plain completion instead of chat")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--steps", type=int, help="BD3LM denoising steps")
    ap.add_argument("--block-size", type=int, help="BD3LM block size")
    ap.add_argument("--threshold", type=float, help="SDLM confidence threshold")
    ap.add_argument("--alg", help="SDLM algorithm")
    ap.add_argument("--delay", type=float, default=0.05, help="seconds each frame stays on screen")
    ap.add_argument("--no-color", action="store_true")
    args = ap.parse_args(argv)

    from openai import OpenAI

    client = OpenAI(base_url=args.base_url, api_key="unused")
    model = args.model or client.models.list().data[0].id
    xargs = {"trace": True}
    for name in ("steps", "block_size", "threshold", "alg"):
        if getattr(args, name) is not None:
            xargs[name] = getattr(args, name)
    common = dict(model=model, max_tokens=args.max_tokens, temperature=args.temperature, stream=True,
                  extra_body={"vllm_xargs": xargs})
    if args.completion:
        stream = client.completions.create(prompt=args.prompt, **common)
    else:
        stream = client.chat.completions.create(messages=[{"role": "user", "content": args.prompt}], **common)

    committed, frames, out = "", 0, sys.stdout
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        for frame in getattr(choice, "blockdiff_trace", None) or []:
            frames += 1
            draw(out, f"{model}  step {frame['step']} ({frame['kind']})", committed, frame, not args.no_color)
            time.sleep(args.delay)
        delta = choice.text if args.completion else (choice.delta.content or "")
        if delta:
            committed += delta
            draw(out, f"{model}  {frames} steps", committed, None, not args.no_color)
    draw(out, f"{model}  done: {frames} steps", committed, None, not args.no_color)
    return committed


if __name__ == "__main__":
    main()
