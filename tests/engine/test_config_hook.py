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


@pytest.mark.parametrize(
    "kwargs,named",
    [
        (dict(scheduler_cls="vllm.v1.core.sched.scheduler.Scheduler"), "--scheduler-cls"),
        (dict(worker_cls="vllm.v1.worker.cpu_worker.CPUWorker"), "--worker-cls"),
        (dict(async_scheduling=True), "--async-scheduling"),
        (dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2}),
         "--speculative-config"),
        (dict(logits_processors=["vllm.v1.sample.logits_processor:MinTokensLogitsProcessor"]),
         "--logits-processors"),
    ],
)
def test_settings_our_models_cannot_run_with_are_refused_naming_them(bd3lm_ckpt, sdlm8_ckpt, kwargs, named):
    for ckpt in (bd3lm_ckpt, sdlm8_ckpt):
        with pytest.raises(ValueError, match=named):
            _engine_config(ckpt, **kwargs)


def test_our_own_classes_and_subclasses_are_accepted(bd3lm_ckpt):
    config = _engine_config(bd3lm_ckpt, scheduler_cls="vllm_blockdiff.engine.scheduler.BD3LMScheduler",
                            worker_cls="vllm_blockdiff.engine.worker.BlockDiffCPUWorker")
    assert config.scheduler_config.scheduler_cls.endswith("BD3LMScheduler")


def test_model_runner_v2_forced_on_is_refused(bd3lm_ckpt, monkeypatch):
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(ValueError, match="VLLM_USE_V2_MODEL_RUNNER"):
        _engine_config(bd3lm_ckpt)


def test_vllm_versions_outside_the_tested_range(bd3lm_ckpt, monkeypatch, caplog):
    from vllm_blockdiff import config as hook

    monkeypatch.setattr(hook, "vllm_version", lambda: "0.31.2")
    with pytest.raises(ValueError, match="needs vLLM 0.32, 0.33; this is vLLM 0.31.2"):
        _engine_config(bd3lm_ckpt)
    monkeypatch.setattr(hook, "vllm_version", lambda: "0.34.0")
    warnings = []
    monkeypatch.setattr(hook.logger, "warning", lambda msg, *args: warnings.append(msg % args))
    _engine_config(bd3lm_ckpt)
    assert any("tested with vLLM 0.32, 0.33; this is vLLM 0.34.0" in w for w in warnings)


def test_other_models_keep_their_settings(tmp_path):
    """A plain Qwen2 checkpoint: the hook never runs, a user's scheduler and worker stay as given."""
    from tests.plain_model import build_plain_qwen2

    plain = build_plain_qwen2(tmp_path / "qwen2")
    config = _engine_config(plain, scheduler_cls="vllm.v1.core.sched.scheduler.Scheduler")
    assert config.scheduler_config.scheduler_cls == "vllm.v1.core.sched.scheduler.Scheduler"
    assert config.parallel_config.worker_cls != "vllm_blockdiff.engine.worker.BlockDiffCPUWorker"
    assert not hasattr(config.model_config.hf_config, "blockdiff_family")
