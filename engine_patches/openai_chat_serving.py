"""Stream per-step denoising frames in ``/v1/chat/completions`` for requests with the ``trace`` option.

Target: ``vllm.entrypoints.openai.chat_completion.serving.OpenAIServingChat.chat_completion_stream_generator``.
Why: as ``openai_completion_serving``, for chat: the visualising chat client
(``examples/visualize_denoising.py``) draws each step's block from these frames.
How: keep the original; for a streamed request with ``vllm_xargs.trace`` run it over a tap of the
results that removes the frames and emits them as extra chunks (``object:
chat.completion.chunk``, empty ``delta``, ``choices[0].blockdiff_trace``) ahead of the step's
text chunk. Other requests are untouched.
Also ``OpenAIServingChat.create_chat_completion``: for our models a request carrying one of the removed
``guided_*`` fields (which vLLM ignores with a warning) is refused with a 400 naming it, since it asks for constraints
the decoder does not enforce (``engine_patches._common.refuse_guided_fields``).
Upstream PR: none; removable if vLLM grows a way for a model to stream per-step extras.
Drift guard: raises at apply time if the method or its ``request``/``result_generator``/
``request_id``/``model_name``/``tokenizer`` parameters are gone;
``tests/serving/test_visualizer.py`` reads the frames end to end.
"""

from __future__ import annotations

import time

from vllm.entrypoints.openai.chat_completion import serving as upstream

_NEEDED = {"request", "result_generator", "request_id", "model_name", "tokenizer"}


def apply() -> None:
    from engine_patches._common import refuse_guided_fields
    from vllm_blockdiff.serving_trace import patch_stream_generator

    refuse_guided_fields(upstream.OpenAIServingChat, "create_chat_completion")
    patch_stream_generator(
        upstream.OpenAIServingChat,
        "chat_completion_stream_generator",
        _NEEDED,
        output_of=lambda result: result,
        frame_choice=lambda result, n: result.outputs[0].index,
        envelope=lambda args, choice: {
            "id": args["request_id"], "object": "chat.completion.chunk", "created": int(time.time()),
            "model": args["model_name"], "choices": [{**choice, "delta": {}}],
        },
    )
