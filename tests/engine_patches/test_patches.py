"""Every patch module is registered, applied, documented, and guards against upstream drift."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil

import pytest

import engine_patches

REQUIRED_DOC_FIELDS = ("Target:", "Why:", "How:", "Upstream PR:", "Drift guard:")


def test_every_patch_module_is_registered():
    modules = {m.name for m in pkgutil.iter_modules(engine_patches.__path__) if not m.name.startswith("_")}
    assert modules == set(engine_patches.PATCHES)


@pytest.mark.parametrize("name", engine_patches.PATCHES)
def test_patch_targets_exist(name):
    assert importlib.util.find_spec(engine_patches.PATCHES[name].target) is not None


@pytest.mark.parametrize("name", engine_patches.PATCHES)
def test_patch_is_documented(name):
    doc = importlib.import_module(f"engine_patches.{name}").__doc__ or ""
    for field in REQUIRED_DOC_FIELDS:
        assert field in doc, f"engine_patches.{name} docstring lacks {field!r}"


def _patched_symbols():
    from vllm.entrypoints.generate.beam_search.offline import BeamSearchOfflineMixin
    from vllm.entrypoints.generate.beam_search.online import BeamSearchOnlineMixin
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
    from vllm.tokenizers.hf import CachedHfTokenizer
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.executor.ray_executor_v2 import RayExecutorV2, RayWorkerProc
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    return {
        "input_processor": [(InputProcessor, "_validate_params"), (InputProcessor, "process_inputs")],
        "async_llm": [(AsyncLLM, "generate")],
        "tokenizers_hf": [(CachedHfTokenizer, "from_pretrained")],
        "beam_search_online": [(BeamSearchOnlineMixin, "beam_search")],
        "beam_search_offline": [(BeamSearchOfflineMixin, "beam_search")],
        "metrics_loggers": [(PrometheusStatLogger, "__init__")],
        "openai_completion_serving": [(OpenAIServingCompletion, "completion_stream_generator"),
                                      (OpenAIServingCompletion, "create_completion")],
        "openai_chat_serving": [(OpenAIServingChat, "chat_completion_stream_generator"),
                                (OpenAIServingChat, "create_chat_completion")],
        "ray_executor_v2": [(RayWorkerProc, "get_node_and_physical_gpu_ids"),
                            (RayExecutorV2, "_get_actor_resource_kwargs")],
    }


@pytest.mark.parametrize("name", [n for n in engine_patches.PATCHES if n != "cpu_platform"])
def test_patch_is_applied_once(name):
    engine_patches.apply_all()
    patched = [getattr(owner, attr) for owner, attr in _patched_symbols()[name]]
    engine_patches.apply_all()
    assert [getattr(owner, attr) for owner, attr in _patched_symbols()[name]] == patched
    assert getattr(patched[0], "_blockdiff_patched", False)


def test_stream_patch_refuses_a_changed_upstream_signature():
    from vllm_blockdiff.serving_trace import patch_stream_generator

    class Drifted:
        async def completion_stream_generator(self, request, results):  # upstream renamed parameters
            yield ""

    with pytest.raises(RuntimeError, match="changed upstream"):
        patch_stream_generator(Drifted, "completion_stream_generator", {"request", "result_generator"},
                               output_of=None, frame_choice=None, envelope=None)


def test_input_processor_patch_refuses_a_changed_upstream_signature(monkeypatch):
    from vllm.v1.engine import input_processor as upstream

    from engine_patches import input_processor

    class Drifted:
        def _validate_params(self, params, supported_tasks, extra):  # upstream grew a parameter
            return None

    monkeypatch.setattr(upstream, "InputProcessor", Drifted)
    with pytest.raises(RuntimeError, match="changed upstream"):
        input_processor.apply()


def test_metrics_loggers_patch_refuses_a_changed_upstream_signature(monkeypatch):
    from engine_patches import metrics_loggers

    class DriftedProm:
        def __init__(self, speculative_config, labelnames):  # upstream dropped a parameter
            pass

    class FreshLogger:  # an unpatched logger class, so apply() gets past its idempotence check
        def __init__(self, vllm_config):
            pass

    monkeypatch.setattr(metrics_loggers, "SpecDecodingProm", DriftedProm)
    monkeypatch.setattr(metrics_loggers.upstream, "PrometheusStatLogger", FreshLogger)
    with pytest.raises(RuntimeError, match="changed upstream"):
        metrics_loggers.apply()


def test_cpu_platform_declares_a_ray_resource():
    from vllm.platforms.cpu import CpuPlatform

    engine_patches.apply_all()
    assert CpuPlatform.ray_device_key == "CPU"
