"""The ``trace`` option in the OpenAI server: every denoising step streamed as it happens.

A request with ``vllm_xargs: {"trace": true}`` and ``stream: true`` receives, besides the usual
text chunks, one chunk per engine step whose choice carries ``blockdiff_trace``: a list of
frames (usually one), each

    {"step": int, "kind": "bd3lm" | "sdlm", "position": int, "tokens": [str | null, ...],
     "accepted": int (sdlm), "committed": int (bd3lm)}

``position`` is the number of completion tokens committed before the frame's span; ``tokens``
the span's tokens as text, ``null`` for a still-masked slot. BD3LM: the canvas after the step
(the block being denoised) and how many of its positions this step committed. SDLM: the window's
predictions, of which the first ``accepted`` committed. A frame's chunk comes before the text chunk of
the same step, so a client can draw ``text so far + frame``. Text chunks are unchanged: their
concatenation is the completion.

Frames travel from the runner (``ModelRunnerOutput.blockdiff_trace``) through the scheduler into
the step's ``EngineCoreOutput.kv_transfer_params["blockdiff_trace"]`` (vLLM forwards that dict
into each ``RequestOutput``); ``engine_patches/openai_completion_serving.py`` and
``openai_chat_serving.py`` turn them into chunks with the helpers here.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator, Callable

from engine_patches._common import serves_ours

TRACE_KEY = "blockdiff_trace"


def wants_trace(request) -> bool:
    return bool((getattr(request, "vllm_xargs", None) or {}).get("trace")) and bool(getattr(request, "stream", False))


def take_frames(output) -> list[dict] | None:
    """Remove and return the frames a ``RequestOutput`` carries (its ``kv_transfer_params`` is left
    as it would be without them)."""
    params = getattr(output, "kv_transfer_params", None)
    if not params or TRACE_KEY not in params:
        return None
    frames = params.pop(TRACE_KEY)
    if not params:
        output.kv_transfer_params = None
    return frames


def render(frames: list[dict], tokenizer, steps: dict) -> list[dict]:
    """Frames with token ids turned into text (``None`` for a mask), numbered per choice."""
    rendered = []
    for frame in frames:
        mask = frame.get("mask")
        tokens = [None if t == mask else (tokenizer.decode([t]) if tokenizer is not None else str(t))
                  for t in frame["tokens"]]
        key = frame.get("kind")
        steps[key] = steps.get(key, 0) + 1
        item = {"step": steps[key], "kind": frame["kind"], "position": frame["position"], "tokens": tokens}
        for key in ("accepted", "committed"):  # SDLM: window tokens accepted; BD3LM: positions committed
            if key in frame:
                item[key] = frame[key]
        rendered.append(item)
    return rendered


async def interleave_frames(
    inner: Callable[[AsyncIterator], AsyncIterator[str]],
    results: AsyncIterator,
    output_of: Callable[[object], object],
    frame_chunk: Callable[[object, list[dict]], str],
) -> AsyncIterator[str]:
    """Run vLLM's stream generator ``inner`` over ``results`` and add a trace chunk (``frame_chunk``)
    for every result that carries frames, ahead of the text chunk ``inner`` makes from it."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def tap():
        async for item in results:
            frames = take_frames(output_of(item))
            if frames:
                await queue.put(frame_chunk(item, frames))
            yield item

    async def drive():
        try:
            async for chunk in inner(tap()):
                await queue.put(chunk)
        finally:
            await queue.put(done)

    task = asyncio.create_task(drive())
    try:
        while (chunk := await queue.get()) is not done:
            yield chunk
        await task  # re-raise what the generator raised
    finally:
        if not task.done():
            task.cancel()


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def patch_stream_generator(cls, name: str, needed: set[str], output_of: Callable, frame_choice: Callable,
                           envelope: Callable) -> None:
    """Wrap ``cls.<name>`` (one of vLLM's OpenAI stream generators) so a traced streamed request gets
    its frames as extra chunks: ``envelope(bound_arguments, choice)`` is the chunk around
    ``frame_choice(item, rendered_frames)``, ``output_of(item)`` the ``RequestOutput`` of a
    result the generator consumes. Raises if the generator or the ``needed`` parameters are gone."""
    original = cls.__dict__.get(name)
    if getattr(original, "_blockdiff_patched", False):
        return
    if original is None or not needed <= set(inspect.signature(original).parameters):
        raise RuntimeError(f"engine_patches: {cls.__name__}.{name} changed upstream; update the patch")
    signature = inspect.signature(original)

    def stream_generator(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        request = bound.arguments["request"]
        if not wants_trace(request) or not serves_ours(getattr(self, "model_config", None)):
            return original(self, *args, **kwargs)
        n = getattr(request, "n", None) or 1
        tokenizer = bound.arguments["tokenizer"]
        steps: dict = {}

        def frame_chunk(item, frames):
            index = frame_choice(item, n)
            choice = {"index": index, "blockdiff_trace": render(frames, tokenizer, steps.setdefault(index, {}))}
            return sse(envelope(bound.arguments, choice))

        def inner(results):
            bound.arguments["result_generator"] = results
            return original(*bound.args, **bound.kwargs)

        return interleave_frames(inner, bound.arguments["result_generator"], output_of, frame_chunk)

    stream_generator._blockdiff_patched = True
    setattr(cls, name, stream_generator)
