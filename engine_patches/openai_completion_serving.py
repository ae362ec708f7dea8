"""Stream per-step denoising frames in ``/v1/completions`` for requests with the ``trace`` option.

Target: ``vllm.entrypoints.openai.completion.serving.OpenAIServingCompletion.completion_stream_generator``.
Why: the seed card's "visualized generation" (the block being denoised, step by step) needs the
canvas of every step in the response stream, including steps that commit no text, which vLLM's
generator never turns into chunks (it skips empty deltas before the first token). The frames
reach this process in each ``RequestOutput.kv_transfer_params`` (``vllm_blockdiff.serving_trace``).
How: keep the original; for a streamed request with ``vllm_xargs.trace`` run it over a tap of the
results that removes the frames and emits them as extra chunks (empty text,
``choices[0].blockdiff_trace``) ahead of the step's text chunk. Other requests are untouched.
Upstream PR: none; removable if vLLM grows a way for a model to stream per-step extras.
Drift guard: raises at apply time if the method or its ``request``/``result_generator``/
``request_id``/``created_time``/``model_name``/``tokenizer`` parameters are gone;
``tests/serving/test_visualizer.py`` reads the frames end to end.
"""

from __future__ import annotations

import inspect

from vllm.entrypoints.openai.completion import serving as upstream

_NEEDED = {"request", "result_generator", "request_id", "created_time", "model_name", "tokenizer"}


def apply() -> None:
    from vllm_blockdiff import serving_trace

    cls = upstream.OpenAIServingCompletion
    original = cls.__dict__.get("completion_stream_generator")
    if getattr(original, "_blockdiff_patched", False):
        return
    if original is None or not _NEEDED <= set(inspect.signature(original).parameters):
        raise RuntimeError(
            "engine_patches.openai_completion_serving: completion_stream_generator changed upstream; "
            "update the patch"
        )
    signature = inspect.signature(original)

    def completion_stream_generator(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        request = bound.arguments["request"]
        if not serving_trace.wants_trace(request):
            return original(self, *args, **kwargs)
        n = request.n or 1
        steps: dict = {}
        tokenizer = bound.arguments["tokenizer"]

        def frame_chunk(item, frames):
            prompt_idx, result = item
            index = prompt_idx * n + result.outputs[0].index
            choice = {"index": index, "text": "",
                      "blockdiff_trace": serving_trace.render(frames, tokenizer, steps.setdefault(index, {}))}
            return serving_trace.sse({"id": bound.arguments["request_id"], "object": "text_completion",
                                      "created": bound.arguments["created_time"],
                                      "model": bound.arguments["model_name"], "choices": [choice]})

        def inner(results):
            bound.arguments["result_generator"] = results
            return original(*bound.args, **bound.kwargs)

        return serving_trace.interleave_frames(inner, bound.arguments["result_generator"],
                                               lambda item: item[1], frame_chunk)

    completion_stream_generator._blockdiff_patched = True
    cls.completion_stream_generator = completion_stream_generator
