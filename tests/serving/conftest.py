"""Real ``vllm serve`` processes shared by the serving tests (one per family, for the whole package)."""

from __future__ import annotations

import pytest

from tests.serving.server import openai_client, vllm_serve

# Tool calling on, so requests with tool_choice "required" / a named function reach the engine's checks.
TOOLS = ("--enable-auto-tool-choice", "--tool-call-parser", "hermes")


# The BD3LM server's model has random weights: under a JSON grammar it would write whitespace until
# max_tokens (valid JSON so far, never closed); vLLM's option for JSON without free whitespace.
COMPACT_JSON = ("--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}')


@pytest.fixture(scope="package")
def bd3lm_server(bd3lm_ckpt, tmp_path_factory):
    with vllm_serve(bd3lm_ckpt, tmp_path_factory.mktemp("logs") / "bd3lm.log", TOOLS + COMPACT_JSON) as base:
        yield base


@pytest.fixture(scope="package")
def bd3lm_client(bd3lm_server):
    return openai_client(bd3lm_server)


@pytest.fixture(scope="package")
def letters_ckpt(tmp_path_factory):
    from vllm_blockdiff.testing.trained_sdlm import build_trained_sdlm_checkpoint

    return build_trained_sdlm_checkpoint(tmp_path_factory.mktemp("sdlm_letters_serve"), D=4)


@pytest.fixture(scope="package")
def sdlm_server(letters_ckpt, tmp_path_factory):
    with vllm_serve(letters_ckpt, tmp_path_factory.mktemp("logs") / "sdlm.log", TOOLS) as base:
        yield base


@pytest.fixture(scope="package")
def sdlm_client(sdlm_server):
    return openai_client(sdlm_server)
