"""The published checkpoint file sets served by ``vllm serve`` as they are (the package's servers run
the tiny checkpoints in those layouts: ``tests/reference/test_references.py::test_published_file_sets``).

SDLM's tokenizer files say ``add_eos_token: true``, which transformers 5 honours and SDLM's own inference
(transformers 4.37, ``tokenizer([chat_text])``) never did: a prompt is its text's tokens without an
appended ``<|endoftext|>`` (``engine_patches/tokenizers_hf.py``).
"""

from __future__ import annotations

import json

import requests

from tests.serving.test_serve import completion

ENDOFTEXT = 151643


def test_bd3lm_layout_chat_template_file_and_stored_head(bd3lm_server, bd3lm_ckpt, bd3lm_client):
    from transformers import AutoTokenizer

    assert (bd3lm_ckpt / "chat_template.jinja").exists()
    assert "chat_template" not in json.loads((bd3lm_ckpt / "tokenizer_config.json").read_text())
    messages = [{"role": "user", "content": "Write a BFS in Python."}]
    resp = bd3lm_client.chat.completions.create(model=str(bd3lm_ckpt), messages=messages, max_tokens=8,
                                                temperature=0.0)
    tokenizer = AutoTokenizer.from_pretrained(bd3lm_ckpt)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert resp.usage.prompt_tokens == len(ids) and "Qwen" in tokenizer.decode(ids)  # the jinja default system


def test_sdlm_prompts_carry_no_appended_end_of_text(sdlm_server, letters_ckpt):
    from transformers import AutoTokenizer

    config = json.loads((letters_ckpt / "config.json").read_text())
    assert "casual_attn" in config and (letters_ckpt / "model.safetensors.index.json").exists()
    assert not (letters_ckpt / "tokenizer.json").exists()
    raw = AutoTokenizer.from_pretrained(letters_ckpt)  # transformers 5 as is: appends <|endoftext|>
    text = " a c e g i k"
    assert raw(text).input_ids[-1] == ENDOFTEXT
    sdlm_ids = raw(text, add_special_tokens=False).input_ids  # what SDLM's tokenizer(text) gave
    body = completion(sdlm_server, str(letters_ckpt), prompt=text, max_tokens=12, temperature=0,
                      return_token_ids=True, vllm_xargs={"threshold": 0.9}).json()
    assert body["usage"]["prompt_tokens"] == len(sdlm_ids)
    assert body["choices"][0]["prompt_token_ids"] == sdlm_ids
    assert body["choices"][0]["text"].startswith(" m o q s")  # the trained pattern continues


def test_sdlm_chat_prompt_is_the_template_alone(sdlm_server, letters_ckpt):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(letters_ckpt)
    messages = [{"role": "user", "content": "count"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = tokenizer(text, add_special_tokens=False).input_ids  # SDLM's sdlm_inference.py, minus the eos
    resp = requests.post(f"{sdlm_server}/v1/chat/completions", json={
        "model": str(letters_ckpt), "messages": messages, "max_tokens": 4, "temperature": 0}, timeout=300).json()
    assert resp["usage"]["prompt_tokens"] == len(expected)
