"""Stream per-step denoising frames in ``/v1/chat/completions`` for requests with the ``trace`` option.

Target: ``vllm.entrypoints.openai.chat_completion.serving.OpenAIServingChat.chat_completion_stream_generator``.
Why: as ``openai_completion_serving``, for chat: the visualising chat client
(``examples/visualize_denoising.py``) draws each step's block from these frames.
How: keep the original; for a streamed request with ``vllm_xargs.trace`` run it over a tap of the
results that removes the frames and emits them as extra chunks (``object:
chat.completion.chunk``, empty ``delta``, ``choices[0].blockdiff_trace``) ahead of the step's
text chunk. Other requests are untouched.
Upstream PR: none; removable if vLLM grows a way for a model to stream per-step extras.
Drift guard: raises at apply time if the method or its ``request``/``result_generator``/
``request_id``/``model_name``/``tokenizer`` parameters are gone;
``tests/serving/test_visualizer.py`` reads the frames end to end.
"""

from __future__ import annotations

import inspect
import time

from vllm.entrypoints.openai.chat_completion import serving as upstream

_NEEDED = {"request", "result_generator", "request_id", "model_name", "tokenizer"}


def apply() -> None:
    from vllm_blockdiff import serving_trace

    cls = upstream.OpenAIServingChat
    original = cls.__dict__.get("chat_completion_stream_generator")
    if getattr(original, "_blockdiff_patched", False):
        return
    if original is None or not _NEEDED <= set(inspect.signature(original).parameters):
        raise RuntimeError(
            "engine_patches.openai_chat_serving: chat_completion_stream_generator changed upstream; "
            "update the patch"
        )
    signature = inspect.signature(original)

    def chat_completion_stream_generator(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        request = bound.arguments["request"]
        if not serving_trace.wants_trace(request):
            return original(self, *args, **kwargs)
        steps: dict = {}
        tokenizer = bound.arguments["tokenizer"]
        created = int(time.time())

        def frame_chunk(result, frames):
            index = result.outputs[0].index
            choice = {"index": index, "delta": {},
                      "blockdiff_trace": serving_trace.render(frames, tokenizer, steps.setdefault(index, {}))}
            return serving_trace.sse({"id": bound.arguments["request_id"], "object": "chat.completion.chunk",
                                      "created": created, "model": bound.arguments["model_name"],
                                      "choices": [choice]})

        def inner(results):
            bound.arguments["result_generator"] = results
            return original(*bound.args, **bound.kwargs)

        return serving_trace.interleave_frames(inner, bound.arguments["result_generator"],
                                               lambda result: result, frame_chunk)

    chat_completion_stream_generator._blockdiff_patched = True
    cls.chat_completion_stream_generator = chat_completion_stream_generator
