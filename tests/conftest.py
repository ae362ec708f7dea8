"""Shared fixtures: tiny checkpoints in the published layouts, references, and shared engines.

Engines are expensive (seconds in-process, ~40 s in a subprocess), so each is built once per
session. The in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) lets tests look at the
scheduler; at most one can live in a process, the others run the default subprocess engine.
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

import pytest
import torch

EOS_ID = 151645
PAD_ID = 151643
MASK_ID = 151665
STOP_IDS = (EOS_ID, PAD_ID)  # generation_config.json eos list: vLLM stops at either


# The fast tier (``python -m pytest -m fast``): pure tests that start no engine and no server.
FAST_PATHS = ("tests/algorithms/", "tests/engine_patches/", "tests/reference/", "tests/test_options.py",
              "tests/test_request_fields.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = item.nodeid.replace("\\", "/")
        if path.startswith(FAST_PATHS):
            item.add_marker(pytest.mark.fast)


@contextlib.contextmanager
def env(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def boost_token(ckpt: Path, token_id: int, factor: float) -> None:
    """Scale one row of the stored lm_head so the random model emits that token now and then."""
    from vllm_blockdiff.testing.tiny_checkpoints import load_weights, save_weights

    weights = load_weights(ckpt)
    head = weights["lm_head.weight"].clone()
    head[token_id] *= factor
    weights["lm_head.weight"] = head
    save_weights(ckpt, weights)


def focus_head(ckpt: Path, num_tokens: int, scale: float, seed: int = 0, include: tuple[int, ...] = ()) -> list[int]:
    """Concentrate the stored lm_head on ``num_tokens`` random tokens plus ``include`` (rows scaled by
    ``scale``, the rest by 0.01), so a random model's predictions have confidences spread over (0, 1)."""
    from vllm_blockdiff.testing.tiny_checkpoints import load_weights, save_weights

    weights = load_weights(ckpt)
    head = weights["lm_head.weight"].clone()
    keep = torch.randperm(PAD_ID, generator=torch.Generator().manual_seed(seed))[:num_tokens]
    keep = torch.cat([keep, torch.tensor(include, dtype=torch.long)])
    focused = head[keep] * scale
    head.mul_(0.01)  # not zero: no exact ties among the other tokens
    head[keep] = focused
    weights["lm_head.weight"] = head
    save_weights(ckpt, weights)
    return keep.tolist()


def random_prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(0, PAD_ID) for _ in range(length)]


def truncate_at_stop(tokens: list[int], stop_ids=STOP_IDS) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[: i + 1]
    return tokens


@pytest.fixture(scope="session")
def bd3lm_ckpt(tmp_path_factory) -> Path:
    """Tied-embedding BD3LM checkpoint (the hub's 0.5B layout, tiny sizes)."""
    from vllm_blockdiff.testing.tiny_checkpoints import build_bd3lm_checkpoint

    return build_bd3lm_checkpoint(tmp_path_factory.mktemp("bd3lm"), seed=0)


@pytest.fixture(scope="session")
def bd3lm_eos_ckpt(tmp_path_factory) -> Path:
    """Untied ``lm_head.weight`` stored beside ``tie_word_embeddings: true``; eos fairly likely."""
    from vllm_blockdiff.testing.tiny_checkpoints import build_bd3lm_checkpoint

    ckpt = build_bd3lm_checkpoint(tmp_path_factory.mktemp("bd3lm_eos"), seed=1, untied_lm_head=True)
    boost_token(ckpt, EOS_ID, 2.5)
    return ckpt


@pytest.fixture(scope="session")
def digits_ckpt(tmp_path_factory) -> Path:
    """The BD3LM trained on digit tasks (``testing/trained_bd3lm.py``): answers that can be checked."""
    from vllm_blockdiff.testing.trained_bd3lm import build_trained_bd3lm_checkpoint

    return build_trained_bd3lm_checkpoint(tmp_path_factory.mktemp("bd3lm_digits"))


@pytest.fixture(scope="session")
def sdlm4_ckpt(tmp_path_factory) -> Path:
    """SDLM D=4 (stored lm_head), focused so windows are sometimes confident; <|endoftext|> among
    the likely tokens, so eos lands inside accepted runs now and then."""
    from vllm_blockdiff.testing.tiny_checkpoints import build_sdlm_checkpoint

    ckpt = build_sdlm_checkpoint(tmp_path_factory.mktemp("sdlm4"), D=4, seed=3)
    focus_head(ckpt, 8, 7.0, seed=3, include=(PAD_ID,))
    boost_token(ckpt, PAD_ID, 0.75)  # eos now and then, not every few tokens
    return ckpt


@pytest.fixture(scope="session")
def sdlm8_ckpt(tmp_path_factory) -> Path:
    """SDLM D=8 (stored lm_head), focused like ``sdlm4_ckpt``."""
    from vllm_blockdiff.testing.tiny_checkpoints import build_sdlm_checkpoint

    ckpt = build_sdlm_checkpoint(tmp_path_factory.mktemp("sdlm8"), D=8, seed=4)
    focus_head(ckpt, 8, 7.0, seed=4, include=(PAD_ID,))
    return ckpt


@pytest.fixture(scope="session")
def sdlm4_causal_window_ckpt(tmp_path_factory) -> Path:
    """SDLM D=4 whose config asks for causal attention inside the window, in the older uploads'
    spelling ``casual_attn``."""
    import json

    from vllm_blockdiff.testing.tiny_checkpoints import build_sdlm_checkpoint

    ckpt = build_sdlm_checkpoint(tmp_path_factory.mktemp("sdlm4_causal"), D=4, seed=6)
    focus_head(ckpt, 8, 7.0, seed=6)
    config = json.loads((ckpt / "config.json").read_text())
    config["casual_attn"] = True
    (ckpt / "config.json").write_text(json.dumps(config, indent=2))
    return ckpt


@pytest.fixture(scope="session")
def sdlm4_tied_ckpt(tmp_path_factory) -> Path:
    """SDLM D=4 with tied embeddings (no stored lm_head), like SDLM-3B's Qwen2.5-3B base."""
    from vllm_blockdiff.testing.tiny_checkpoints import build_sdlm_checkpoint

    return build_sdlm_checkpoint(tmp_path_factory.mktemp("sdlm4_tied"), D=4, seed=5, untied_lm_head=False)


@pytest.fixture(scope="session")
def reference_threads():
    # 2 OpenMP threads on this 2-core box make small matmuls ~100x slower than 1.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_llm(model: Path, **kwargs):
    from vllm import LLM

    args = dict(
        model=str(model),
        dtype="float32",
        max_model_len=1024,
        kv_cache_memory_bytes=256 << 20,  # explicit: the utilisation fraction depends on RSS and NUMA node size
        enforce_eager=True,
        seed=0,
    )
    args.update(kwargs)
    return LLM(**args)


def inproc_engine(model: Path, **kwargs):
    """Generator for fixtures: an engine in this process (its scheduler can be inspected), shut down
    after use. Only one can live at a time, so fixtures using it are module- or class-scoped."""
    with env(VLLM_ENABLE_V1_MULTIPROCESSING="0"):
        llm = make_llm(model, **kwargs)
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def inproc_llm(bd3lm_ckpt):
    """The default engine (prefix caching on), in this process so tests can inspect its scheduler."""
    yield from inproc_engine(bd3lm_ckpt)


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


@contextlib.contextmanager
def scheduled_tokens(llm):
    """Record the tokens each request is scheduled per step of an in-process engine (a list, extended)."""
    scheduler = scheduler_of(llm)
    seen: list[int] = []
    original = scheduler.schedule

    def recording_schedule(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.extend(out.num_scheduled_tokens.values())
        return out

    scheduler.schedule = recording_schedule
    try:
        yield seen
    finally:
        scheduler.schedule = original
