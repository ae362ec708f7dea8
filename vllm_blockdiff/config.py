"""Engine settings chosen for our architectures, applied through vLLM's per-architecture config hook.

``vllm.model_executor.models.config.MODELS_CONFIG_MAP`` maps an architecture to a class whose
``verify_and_update_config(vllm_config)`` runs in ``VllmConfig.__post_init__`` before the
platform fills its defaults, so ``LLM(model=dir)`` needs no extra flags.
"""

from __future__ import annotations

from vllm.logger import init_logger

from vllm_blockdiff import __version__
from vllm_blockdiff.compat import tested_range, version_status, vllm_version
from vllm_blockdiff.options import ModelDefaults

logger = init_logger(__name__)

BD3LM_ARCHITECTURES = ("A2DQwen2LMHeadModel",)
SDLM_ARCHITECTURES = ("SDLMQwen2ForCausalLM",)
DEFAULT_BD3LM_BLOCK_SIZE = 32
DEFAULT_SDLM_WINDOW = 4  # SDLM's modeling code falls back to 4 when config.json has no block_size
# KV page size for our models: a multiple of every block size a request may ask for (prefix
# caching hashes whole pages), and of 32 (CPU attention) and 16 (GPU attention kernels).
DEFAULT_KV_PAGE_SIZE = 128
SDLM_CPU_KV_PAGE_SIZE = 32
MASK_TOKENS = ("<|mask|>", "<text_mask>")  # BD3LM, SDLM


def family_of(architectures) -> str | None:
    archs = set(architectures or ())
    if archs & set(BD3LM_ARCHITECTURES):
        return "bd3lm"
    if archs & set(SDLM_ARCHITECTURES):
        return "sdlm"
    return None


def _resolve_mask_token_id(model_config) -> int:
    hf_config = model_config.hf_config
    for attr in ("mask_token_id", "text_mask_token_id"):
        value = getattr(hf_config, attr, None)
        if isinstance(value, int):
            return value
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        model_config.tokenizer,
        revision=model_config.tokenizer_revision,
        trust_remote_code=model_config.trust_remote_code,
    )
    candidates = [tokenizer.mask_token_id]
    candidates += [tokenizer.convert_tokens_to_ids(t) for t in (getattr(hf_config, "text_mask_token", None),
                                                                 *MASK_TOKENS) if t]
    for mask_id in candidates:
        if mask_id is not None and mask_id != tokenizer.unk_token_id:
            return int(mask_id)
    raise ValueError(
        f"{model_config.model}: neither config.json nor the tokenizer names a mask token "
        f"(one of {MASK_TOKENS}); a block-diffusion checkpoint needs one"
    )


SCHEDULERS = {
    "bd3lm": "vllm_blockdiff.engine.scheduler.BD3LMScheduler",
    "sdlm": "vllm_blockdiff.engine.scheduler.SDLMScheduler",
}
CPU_WORKER = "vllm_blockdiff.engine.worker.BlockDiffCPUWorker"
GPU_WORKER = "vllm_blockdiff.engine.gpu_worker.BlockDiffGPUWorker"


def _check_vllm_version() -> str:
    version = vllm_version()
    status = version_status(version)
    if status == "unsupported":
        raise ValueError(
            f"vllm_blockdiff needs vLLM {tested_range()}; this is vLLM {version}, whose engine internals "
            "the plugin's scheduler and runner do not match"
        )
    if status == "untested":
        logger.warning(
            "vllm_blockdiff %s is tested with vLLM %s; this is vLLM %s: serving may break in ways the "
            "tests did not see", __version__, tested_range(), version,
        )
    return version


def _is_ours(value, ours: str) -> bool:
    """A user's class setting that names our class or a subclass of it."""
    from vllm.utils.import_utils import resolve_obj_by_qualname

    if value == ours:
        return True
    try:
        cls = resolve_obj_by_qualname(value) if isinstance(value, str) else value
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, resolve_obj_by_qualname(ours))


def refuse_incompatible_settings(vllm_config, family: str) -> None:
    """Engine settings our models cannot run with raise here, naming them, instead of being
    replaced or of silently running vLLM's own (wrong, for a diffusion model) code path."""
    import os

    from vllm.platforms import current_platform

    sched, parallel, model = vllm_config.scheduler_config, vllm_config.parallel_config, vllm_config.model_config
    worker = CPU_WORKER if current_platform.is_cpu() else GPU_WORKER
    problems = []
    if sched.scheduler_cls is not None and not _is_ours(sched.scheduler_cls, SCHEDULERS[family]):
        problems.append(f"--scheduler-cls {sched.scheduler_cls}: {family} requests need "
                        f"{SCHEDULERS[family]} (or a subclass), which claims their mask slots")
    if parallel.worker_cls != "auto" and not _is_ours(parallel.worker_cls, worker):
        problems.append(f"--worker-cls {parallel.worker_cls}: {family} needs {worker} (or a subclass), "
                        "which builds the diffusion model runner; another worker would run vLLM's "
                        "autoregressive runner and produce garbage")
    if sched.async_scheduling:
        problems.append("--async-scheduling: each step's commits decide the next step's input, so "
                        "nothing can be scheduled ahead")
    if vllm_config.speculative_config is not None:
        problems.append("--speculative-config: the mask slots use vLLM's draft-token path themselves "
                        "(SDLM offers alg=self_speculative instead)")
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower() in ("1", "true"):
        problems.append("VLLM_USE_V2_MODEL_RUNNER=1: the diffusion runner extends the V1 model runner")
    if getattr(vllm_config, "watermark_config", None) is not None:
        problems.append("--watermark-config: watermarking needs Model Runner V2 and vLLM's sampler")
    if model.logits_processors:
        problems.append(f"--logits-processors {model.logits_processors}: diffusion decoding does not run "
                        "vLLM's sampler, so custom logits processors would be ignored")
    if model.enable_prompt_embeds:
        problems.append("--enable-prompt-embeds: canvas and window slots are token ids")
    cudagraph_mode = vllm_config.compilation_config.cudagraph_mode
    if cudagraph_mode is not None and cudagraph_mode.has_full_cudagraphs():
        problems.append(f"cudagraph_mode {cudagraph_mode.name}: attention rows are segments, not "
                        "requests, so only PIECEWISE CUDA graphs are valid")
    import engine_patches

    for name, err in engine_patches.FAILED.items():
        problems.append(f"engine patch {name} did not apply ({err})")
    if problems:
        raise ValueError(f"{model.model}: these engine settings cannot serve a {family} checkpoint:\n  - "
                         + "\n  - ".join(problems))


class BlockDiffusionConfigHook:
    """Selects our scheduler and worker and a prefix-cache-safe KV page size."""

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        from vllm.platforms import current_platform

        model_config = vllm_config.model_config
        hf_config = model_config.hf_config
        family = family_of(model_config.architectures)
        version = _check_vllm_version()
        refuse_incompatible_settings(vllm_config, family)
        hf_config.blockdiff_family = family
        hf_config.blockdiff_mask_token_id = _resolve_mask_token_id(model_config)
        # BD3LM: the hub's configs carry no block size (the card's default 32 applies); honour one if
        # present. SDLM: ``block_size`` is the window D the checkpoint was trained with.
        default_block = DEFAULT_SDLM_WINDOW if family == "sdlm" else DEFAULT_BD3LM_BLOCK_SIZE
        hf_config.blockdiff_block_size = int(getattr(hf_config, "block_size", None) or default_block)
        # Older SDLM uploads spell the flag ``casual_attn``.
        hf_config.blockdiff_window_causal = bool(
            getattr(hf_config, "causal_attn", getattr(hf_config, "casual_attn", False))
        )
        if family == "sdlm" and hf_config.blockdiff_block_size < 2:
            raise ValueError(f"{model_config.model}: SDLM block_size (the window D) must be >= 2")
        window_step = 2 * hf_config.blockdiff_block_size  # accepted last step + the window
        if family == "sdlm" and vllm_config.scheduler_config.max_num_batched_tokens < window_step:
            raise ValueError(
                f"max_num_batched_tokens={vllm_config.scheduler_config.max_num_batched_tokens} cannot hold "
                f"one SDLM step of this checkpoint ({window_step} tokens: D={hf_config.blockdiff_block_size})"
            )

        sched = vllm_config.scheduler_config
        sched.scheduler_cls = SCHEDULERS[family]
        # Each step's commits decide the next step's input; nothing can be scheduled ahead.
        sched.async_scheduling = False

        parallel = vllm_config.parallel_config
        if parallel.worker_cls == "auto":
            parallel.worker_cls = CPU_WORKER if current_platform.is_cpu() else GPU_WORKER
        if not current_platform.is_cpu():
            _use_v1_runner_with_piecewise_graphs(vllm_config)
            if family == "sdlm":
                _use_per_row_causal_attention(vllm_config)
        cache = vllm_config.cache_config
        if not cache.user_specified_block_size:
            if family == "bd3lm":
                cache.block_size = DEFAULT_KV_PAGE_SIZE
                # Otherwise the platform replaces it with its attention backend's preference (GPU: 16).
                cache.user_specified_block_size = True
            elif current_platform.is_cpu():
                # SDLM's self-speculative rows recompute the tail of the last page (under P tokens)
                # per verify window: the smallest page CPU attention takes (GPU's default is 16).
                cache.block_size = SDLM_CPU_KV_PAGE_SIZE
                cache.user_specified_block_size = True
        logger.info(
            "vllm_blockdiff %s on vLLM %s (tested: %s): %s checkpoint, mask id %d, KV page %d, worker %s",
            __version__,
            version,
            tested_range(),
            hf_config.blockdiff_family,
            hf_config.blockdiff_mask_token_id,
            cache.block_size,
            parallel.worker_cls,
        )


def _use_v1_runner_with_piecewise_graphs(vllm_config) -> None:
    """GPU: our runner extends the V1 runner, and attention rows are segments, not requests.

    Model Runner V2 is the GPU default in 0.32; workers read the variable when they start.
    Full CUDA graphs bake the attention metadata's row count (requests) into the graph, while
    our rows are segments, so only piecewise graphs (attention runs eagerly) are safe.
    """
    import os

    from vllm.config import CUDAGraphMode

    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    compilation = vllm_config.compilation_config
    if compilation.cudagraph_mode is None:  # a user's FULL mode was refused above; NONE is kept
        compilation.cudagraph_mode = CUDAGraphMode.PIECEWISE


def _use_per_row_causal_attention(vllm_config) -> None:
    """GPU, SDLM: a step mixes causal rows (accepted tokens) and bidirectional rows (windows).

    ``CommonAttentionMetadata.causal`` then is a per-row int32 tensor, which FlashAttention takes
    only in version 4 (``NotImplementedError`` in FA2/FA3); TRITON_ATTN takes it on every GPU.
    A backend the user chose is kept.
    """
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    attention = vllm_config.attention_config
    if attention.backend is None and attention.flash_attn_version is None:
        attention.backend = AttentionBackendEnum.TRITON_ATTN


def model_defaults(vllm_config) -> ModelDefaults:
    """The per-model option defaults the scheduler, runner and validator share."""
    hf_config = vllm_config.model_config.hf_config
    return ModelDefaults(
        family=hf_config.blockdiff_family,
        mask_token_id=hf_config.blockdiff_mask_token_id,
        block_size=hf_config.blockdiff_block_size,
        kv_page_size=vllm_config.cache_config.block_size,
        max_model_len=vllm_config.model_config.max_model_len,
        max_step_tokens=vllm_config.scheduler_config.max_num_batched_tokens,
        window_causal=hf_config.blockdiff_window_causal,
    )
