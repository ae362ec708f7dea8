"""Every standard request field, and what it does for a block-diffusion request.

One table for ``SamplingParams`` (what the engine sees, offline and over HTTP) and one for the
OpenAI request models' own fields (``/v1/completions``, ``/v1/chat/completions``), each field
marked per family:

- ``works``: as vLLM documents it (front-end and scheduler features: stop strings, ``n``,
  ``seed``, detokenization, streaming options, ...);
- ``ours``: implemented by the plugin's decoding (vocabulary masks and biases on every canvas /
  window row, SDLM's sampling filters and logprobs) — see the note;
- ``refused``: answered with HTTP 400 (``ValueError`` offline) naming the field, because the
  diffusion decoder cannot honour it; the note says why;
- ``internal``: not a request input.

``options.check_request_fields`` enforces the refusals from these tables; a ``SamplingParams``
field the table does not know (a newer vLLM) is refused whenever it is set, never ignored.
``tests/test_request_fields.py`` checks both tables against vLLM's classes, so a field added
upstream fails the suite until it is decided here; ``docs/request_fields.md`` is rendered
from them (``python -m vllm_blockdiff.request_fields``).
"""

from __future__ import annotations

from dataclasses import dataclass

WORKS, OURS, REFUSED, INTERNAL = "works", "ours", "refused", "internal"


@dataclass(frozen=True)
class FieldRule:
    bd3lm: str
    sdlm: str
    note: str
    refusal: str | None = None  # why, in the 400's message, where the note speaks of both families
    endpoints: str = ""  # OpenAI fields: C = /v1/completions, H = /v1/chat/completions

    def status(self, family: str) -> str:
        return self.bd3lm if family == "bd3lm" else self.sdlm


_VOCAB_MASK = ("applied to every canvas position (BD3LM) / window row (SDLM) before the decoding rule; "
               "confidence is then the probability under the masked, biased distribution")

SAMPLING_FIELDS: dict[str, FieldRule] = {
    "n": FieldRule(WORKS, WORKS, "independent sequences, each with its own generator"),
    "presence_penalty": FieldRule(REFUSED, REFUSED, "a penalty by output counts needs one next-token distribution; "
                                  "diffusion rows are decided in parallel"),
    "frequency_penalty": FieldRule(REFUSED, REFUSED, "as presence_penalty"),
    "repetition_penalty": FieldRule(REFUSED, REFUSED, "as presence_penalty"),
    "temperature": FieldRule(WORKS, WORKS, "BD3LM: the card's Gumbel-max noise; SDLM: SDLM's sample_tokens; "
                             "0 = greedy"),
    "watermarking": FieldRule(WORKS, WORKS, "as vLLM without a watermark config (a warning, no watermark); "
                              "--watermark-config itself is refused at start"),
    "top_p": FieldRule(REFUSED, OURS, "BD3LM: not part of the card's algorithm; SDLM: SDLM's top-p filter "
                       "(confidence is the drawn token's filtered probability)",
                       "not part of the card's algorithm (leave it at 1.0)"),
    "top_k": FieldRule(REFUSED, OURS, "BD3LM: not part of the card's algorithm; SDLM: SDLM's top-k filter",
                       "not part of the card's algorithm (leave it unset)"),
    "min_p": FieldRule(REFUSED, REFUSED, "not part of either algorithm"),
    "seed": FieldRule(WORKS, WORKS, "the request's generator (Gumbel noise, random remasking, SDLM draws)"),
    "stop": FieldRule(WORKS, WORKS, "front end, on committed text"),
    "stop_token_ids": FieldRule(WORKS, WORKS, "scheduler, on committed tokens"),
    "ignore_eos": FieldRule(WORKS, WORKS, "BD3LM: also turns off the card's end-of-block stop at eos"),
    "max_tokens": FieldRule(WORKS, WORKS, "exact (SDLM never overshoots)"),
    "min_tokens": FieldRule(OURS, OURS, "stop ids are masked at output positions below min_tokens, " + _VOCAB_MASK),
    "logprobs": FieldRule(REFUSED, OURS, "BD3LM: a token commits after several bidirectional steps, not from "
                          "one distribution; SDLM: the committed token's window row (not with self_speculative)",
                          "a BD3LM token commits after steps of bidirectional denoising, not from one "
                          "next-token distribution"),
    "prompt_logprobs": FieldRule(REFUSED, REFUSED, "the runner computes logits only at canvas/window rows"),
    "prompt_logprob_token_ids": FieldRule(REFUSED, REFUSED, "as prompt_logprobs"),
    "prompt_logprob_start": FieldRule(REFUSED, REFUSED, "as prompt_logprobs"),
    "logprob_token_ids": FieldRule(REFUSED, REFUSED, "only the committed token and its top-k are returned"),
    "flat_logprobs": FieldRule(WORKS, WORKS, "output format of logprobs (where logprobs work)"),
    "detokenize": FieldRule(WORKS, WORKS, "front end"),
    "skip_special_tokens": FieldRule(WORKS, WORKS, "front end (mask ids are special: never in text)"),
    "spaces_between_special_tokens": FieldRule(WORKS, WORKS, "front end"),
    "include_stop_str_in_output": FieldRule(WORKS, WORKS, "front end"),
    "output_kind": FieldRule(WORKS, WORKS, "front end; a streamed delta is a committed span"),
    "stream_interval": FieldRule(WORKS, WORKS, "front end"),
    "skip_clone": FieldRule(INTERNAL, INTERNAL, "vLLM-internal flag"),
    "output_text_buffer_length": FieldRule(INTERNAL, INTERNAL, "set by vLLM from stop strings"),
    "_eos_token_id": FieldRule(INTERNAL, INTERNAL, "set by vLLM from the tokenizer"),
    "_all_stop_token_ids": FieldRule(INTERNAL, INTERNAL, "set by vLLM"),
    "_watermarking_skipped": FieldRule(INTERNAL, INTERNAL, "set by vLLM"),
    "structured_outputs": FieldRule(OURS, OURS, "SDLM: enforced through vLLM's structured-output manager "
                                    "(json, regex, choice, grammar; also set by response_format and tool_choice "
                                    "required / named): window row 0 under the grammar's bitmask, the accepted "
                                    "run cut at the first token the grammar rejects; not with self_speculative. "
                                    "BD3LM: the same forms, enforced by left-frontier commits (the leftmost mask "
                                    "under the bitmask, the run after it checked by the grammar); not with "
                                    "cfg_scale or ignore_eos"),
    "logit_bias": FieldRule(OURS, OURS, "added to the logits, " + _VOCAB_MASK),
    "allowed_token_ids": FieldRule(OURS, OURS, "every other token masked, " + _VOCAB_MASK),
    "extra_args": FieldRule(OURS, OURS, "the diffusion options (README tables); unknown keys are refused"),
    "bad_words": FieldRule(OURS, OURS, "never completed anywhere in the output: a position's token is masked "
                           "when it would complete a bad word with the tokens committed around it; BD3LM "
                           "commits of one step are checked in confidence order, SDLM acceptance stops before "
                           "a row that would complete one; " + _VOCAB_MASK),
    "_bad_words_token_ids": FieldRule(INTERNAL, INTERNAL, "set by vLLM from bad_words"),
    "skip_reading_prefix_cache": FieldRule(WORKS, WORKS, "scheduler"),
    "thinking_token_budget": FieldRule(REFUSED, REFUSED, "vLLM enforces it in its sampler, which diffusion "
                                       "decoding does not run"),
    "repetition_detection": FieldRule(WORKS, WORKS, "scheduler stop check, on committed tokens"),
    "routed_experts_prompt_start": FieldRule(WORKS, WORKS, "no effect: the served models are not MoE"),
    "trace_decode_token_ids": FieldRule(REFUSED, REFUSED, "forced replay runs in vLLM's sampler"),
}

# The OpenAI request models' fields that are not SamplingParams fields of the same name (those are
# in SAMPLING_FIELDS).
OPENAI_FIELDS: dict[str, FieldRule] = {
    "model": FieldRule(WORKS, WORKS, "the served model's name", endpoints="C, H"),
    "prompt": FieldRule(WORKS, WORKS, "text or token ids", endpoints="C"),
    "messages": FieldRule(WORKS, WORKS, "the checkpoint's chat template", endpoints="H"),
    "stream": FieldRule(WORKS, WORKS, "one chunk per committed span; bad options are a 400 before the "
                        "stream starts", endpoints="C, H"),
    "stream_options": FieldRule(WORKS, WORKS, "include_usage, continuous_usage_stats", endpoints="C, H"),
    "max_completion_tokens": FieldRule(WORKS, WORKS, "max_tokens", endpoints="H"),
    "top_logprobs": FieldRule(REFUSED, OURS, "with logprobs (see logprobs)", endpoints="H"),
    "echo": FieldRule(WORKS, WORKS, "the prompt before the completion", endpoints="C, H"),
    "suffix": FieldRule(WORKS, WORKS, "as vLLM (refused unless the model renders fill-in-the-middle)", endpoints="C"),
    "user": FieldRule(WORKS, WORKS, "accepted and unused, as vLLM", endpoints="C, H"),
    "use_beam_search": FieldRule(REFUSED, REFUSED, "beam search expands one next-token distribution per "
                                 "step; a diffusion step commits a block or a window", endpoints="C, H"),
    "length_penalty": FieldRule(WORKS, WORKS, "used by beam search only (refused), unused otherwise, as vLLM",
                                endpoints="C, H"),
    "response_format": FieldRule(OURS, OURS, "json_object / json_schema / structural_tag become "
                                 "structured_outputs (enforced); text works",
                                 endpoints="C, H"),
    "tools": FieldRule(WORKS, WORKS, "rendered by the chat template; tool calls parsed by --tool-call-parser",
                       endpoints="H"),
    "tool_choice": FieldRule(WORKS, WORKS, "none / auto work; required or a named function become "
                             "structured_outputs (enforced)", endpoints="H"),
    "parallel_tool_calls": FieldRule(WORKS, WORKS, "tool-call parsing", endpoints="H"),
    "include_reasoning": FieldRule(WORKS, WORKS, "--reasoning-parser output parsing", endpoints="H"),
    "reasoning_effort": FieldRule(WORKS, WORKS, "passed to the chat template", endpoints="H"),
    "add_generation_prompt": FieldRule(WORKS, WORKS, "chat template", endpoints="H"),
    "continue_final_message": FieldRule(WORKS, WORKS, "chat template", endpoints="H"),
    "chat_template": FieldRule(WORKS, WORKS, "a template for this request", endpoints="H"),
    "chat_template_kwargs": FieldRule(WORKS, WORKS, "passed to the chat template", endpoints="H"),
    "documents": FieldRule(WORKS, WORKS, "chat template", endpoints="H"),
    "return_prompt_text": FieldRule(WORKS, WORKS, "the rendered prompt in the response", endpoints="H"),
    "add_special_tokens": FieldRule(WORKS, WORKS, "tokenization", endpoints="C, H"),
    "truncate_prompt_tokens": FieldRule(WORKS, WORKS, "tokenization", endpoints="C, H"),
    "truncation_side": FieldRule(WORKS, WORKS, "tokenization", endpoints="C, H"),
    "cache_salt": FieldRule(WORKS, WORKS, "prefix-cache isolation (pages hash with the salt)", endpoints="C, H"),
    "priority": FieldRule(WORKS, WORKS, "with --scheduling-policy priority (preemption is safe)", endpoints="C, H"),
    "request_id": FieldRule(WORKS, WORKS, "the response's id", endpoints="C, H"),
    "session_id": FieldRule(WORKS, WORKS, "as vLLM", endpoints="C, H"),
    "return_token_ids": FieldRule(WORKS, WORKS, "the committed token ids (BD3LM: mask ids the card\'s eos stop "
                                  "left, never in text)", endpoints="C, H"),
    "return_token_offsets": FieldRule(WORKS, WORKS, "text offsets of the committed tokens", endpoints="C, H"),
    "return_tokens_as_token_ids": FieldRule(WORKS, WORKS, "logprob tokens as ids (where logprobs work)",
                                            endpoints="C, H"),
    "return_weight_versions": FieldRule(WORKS, WORKS, "vLLM 0.33; as vLLM", endpoints="C, H"),
    "vllm_xargs": FieldRule(OURS, OURS, "the diffusion options (SamplingParams.extra_args)", endpoints="C, H"),
    "kv_transfer_params": FieldRule(REFUSED, REFUSED, "disaggregated prefill needs a KV connector, and a "
                                    "canvas's KV is rewritten every step", endpoints="C, H"),
    "ec_transfer_params": FieldRule(REFUSED, REFUSED, "encoder-cache transfer (multimodal)", endpoints="C, H"),
    "prompt_embeds": FieldRule(REFUSED, REFUSED, "--enable-prompt-embeds is refused at start", endpoints="C"),
    "mm_payload": FieldRule(WORKS, WORKS, "as vLLM for a text-only model: multimodal input is an error",
                            endpoints="C, H"),
    "return_mm_kwargs": FieldRule(WORKS, WORKS, "as vLLM for a text-only model", endpoints="C, H"),
    "mm_processor_kwargs": FieldRule(WORKS, WORKS, "as vLLM for a text-only model", endpoints="H"),
    "media_io_kwargs": FieldRule(WORKS, WORKS, "as vLLM for a text-only model", endpoints="H"),
}


# Removed by vLLM (0.12), which now ignores them with a warning for every model; a request that still sends
# one wants constraints (engine_patches._common.REMOVED_GUIDED_FIELDS).
for _name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
              "guided_whitespace_pattern"):
    OPENAI_FIELDS[_name] = FieldRule(REFUSED, REFUSED, "removed by vLLM (ignored, with a warning, for other "
                                     "models); refused: structured outputs are not enforced", endpoints="C, H")


def render_markdown() -> str:
    """The two tables as the Markdown page ``docs/request_fields.md``."""
    lines = [
        "# Request fields",
        "",
        "What every standard request field does for a block-diffusion request. Generated from",
        "`vllm_blockdiff/request_fields.py` (`python -m vllm_blockdiff.request_fields > docs/request_fields.md`);",
        "a test keeps the two in step and checks the tables against vLLM's own classes.",
        "",
        "`works`: as vLLM documents it. `ours`: implemented by the plugin's decoding (see the note).",
        "`refused`: HTTP 400 (offline: `ValueError`) naming the field, streamed or not; the engine keeps",
        "serving. `internal`: not a request input. A `SamplingParams` field unknown to the table (a newer",
        "vLLM) is refused whenever it is set.",
        "",
        "## SamplingParams (offline `LLM` and every HTTP endpoint)",
        "",
        "| field | BD3LM | SDLM | note |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{name}` | {r.bd3lm} | {r.sdlm} | {r.note} |" for name, r in SAMPLING_FIELDS.items()]
    lines += [
        "",
        "## OpenAI request fields beyond SamplingParams (C = /v1/completions, H = /v1/chat/completions)",
        "",
        "| field | endpoints | BD3LM | SDLM | note |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| `{name}` | {r.endpoints} | {r.bd3lm} | {r.sdlm} | {r.note} |" for name, r in OPENAI_FIELDS.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render_markdown(), end="")
