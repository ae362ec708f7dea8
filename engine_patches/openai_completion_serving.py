"""Stream per-step denoising frames in ``/v1/completions`` for requests with the ``trace`` option.

Target: ``vllm.entrypoints.openai.completion.serving.OpenAIServingCompletion.completion_stream_generator``.
Why: the seed card's "visualized generation" (the block being denoised, step by step) needs the
canvas of every step in the response stream, including steps that commit no text, which vLLM's
generator never turns into chunks (it skips empty deltas before the first token). The frames
reach this process in each ``RequestOutput.kv_transfer_params`` (``vllm_blockdiff.serving_trace``).
How: keep the original; for a streamed request with ``vllm_xargs.trace`` run it over a tap of the
results that removes the frames and emits them as extra chunks (empty text,
``choices[0].blockdiff_trace``) ahead of the step's text chunk. Other requests are untouched.
Also ``OpenAIServingCompletion.create_completion``: for our models a request carrying one of the removed
``guided_*`` fields (which vLLM ignores with a warning) is refused with a 400 naming it, since it asks for constraints
the decoder does not enforce (``engine_patches._common.refuse_guided_fields``).
Upstream PR: none; removable if vLLM grows a way for a model to stream per-step extras.
Drift guard: raises at apply time if the method or its ``request``/``result_generator``/
``request_id``/``created_time``/``model_name``/``tokenizer`` parameters are gone;
``tests/serving/test_visualizer.py`` reads the frames end to end.
"""

from __future__ import annotations

from vllm.entrypoints.openai.completion import serving as upstream

_NEEDED = {"request", "result_generator", "request_id", "created_time", "model_name", "tokenizer"}


def apply() -> None:
    from engine_patches._common import refuse_guided_fields
    from vllm_blockdiff.serving_trace import patch_stream_generator

    refuse_guided_fields(upstream.OpenAIServingCompletion, "create_completion")
    patch_stream_generator(
        upstream.OpenAIServingCompletion,
        "completion_stream_generator",
        _NEEDED,
        output_of=lambda item: item[1],  # (prompt index, RequestOutput)
        frame_choice=lambda item, n: item[0] * n + item[1].outputs[0].index,
        envelope=lambda args, choice: {
            "id": args["request_id"], "object": "text_completion", "created": args["created_time"],
            "model": args["model_name"], "choices": [{**choice, "text": ""}],
        },
    )
