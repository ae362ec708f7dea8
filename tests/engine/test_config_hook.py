"""The per-architecture config hook: what ``LLM(model=dir)`` gets without any flag."""

from __future__ import annotations

import pytest

from vllm_blockdiff.config import DEFAULT_KV_PAGE_SIZE, model_defaults


def _engine_config(model, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model), max_model_len=512, **kwargs).create_engine_config()


@pytest.fixture(scope="module")
def ckpt_with_block16(tmp_path_factory):
    from vllm_blockdiff.testing.tiny_checkpoints import build_bd3lm_checkpoint

    return build_bd3lm_checkpoint(tmp_path_factory.mktemp("bd3lm16"), block_size=16)


def test_hook_selects_our_engine_parts(bd3lm_ckpt):
    config = _engine_config(bd3lm_ckpt)
    assert config.scheduler_config.scheduler_cls.endswith("BD3LMScheduler")
    assert config.parallel_config.worker_cls.endswith("BlockDiffCPUWorker")
    assert config.scheduler_config.async_scheduling is False
    assert config.cache_config.block_size == DEFAULT_KV_PAGE_SIZE
    defaults = model_defaults(config)
    assert (defaults.family, defaults.mask_token_id, defaults.block_size) == ("bd3lm", 151665, 32)


def test_checkpoint_block_size_becomes_the_default(ckpt_with_block16):
    assert model_defaults(_engine_config(ckpt_with_block16)).block_size == 16


def test_user_kv_page_size_is_kept(bd3lm_ckpt):
    assert _engine_config(bd3lm_ckpt, block_size=64).cache_config.block_size == 64


def test_sdlm_checkpoint_gets_its_scheduler_window_and_attention_flag(sdlm8_ckpt, sdlm4_causal_window_ckpt):
    config = _engine_config(sdlm8_ckpt)
    assert config.scheduler_config.scheduler_cls.endswith("SDLMScheduler")
    defaults = model_defaults(config)
    assert (defaults.family, defaults.mask_token_id, defaults.block_size, defaults.window_causal) == (
        "sdlm", 151665, 8, False)
    assert config.cache_config.block_size == 32  # CPU: self-speculative rows recompute a page tail
    assert model_defaults(_engine_config(sdlm4_causal_window_ckpt)).window_causal is True


def test_sdlm_step_must_fit_the_token_budget(sdlm8_ckpt):
    with pytest.raises(ValueError, match="cannot hold one SDLM step"):
        _engine_config(sdlm8_ckpt, max_num_batched_tokens=12)
