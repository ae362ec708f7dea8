"""vllm_blockdiff: serve block-diffusion language models (BD3LM, SDLM) with vLLM.

``register()`` is the ``vllm.general_plugins`` entry point; vLLM calls it in every process
(API server, engine core, workers), so everything here must be cheap and idempotent, and must
leave models that are not ours exactly as vLLM serves them: it registers our architectures
and config class, and arranges for the engine patches to apply when (and only if) their
upstream modules are imported (``engine_patches``).
"""

__version__ = "0.1.0"

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True

    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.logger import init_logger
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from vllm_blockdiff.compat import tested_range, version_status, vllm_version
    from vllm_blockdiff.config import BD3LM_ARCHITECTURES, SDLM_ARCHITECTURES, BlockDiffusionConfigHook
    from vllm_blockdiff.models.bd3lm import A2DQwen2Config

    if version_status(vllm_version()) == "unsupported":
        # Other models keep working; ours are refused by the config hook with the same reason.
        init_logger(__name__).warning(
            "vllm_blockdiff needs vLLM %s; this is vLLM %s: its models will be refused", tested_range(),
            vllm_version(),
        )
    AutoConfig.register(A2DQwen2Config.model_type, A2DQwen2Config, exist_ok=True)
    for archs, model_class in (
        (BD3LM_ARCHITECTURES, "vllm_blockdiff.models.bd3lm:A2DQwen2LMHeadModel"),
        (SDLM_ARCHITECTURES, "vllm_blockdiff.models.sdlm:SDLMQwen2ForCausalLM"),
    ):
        for arch in archs:
            ModelRegistry.register_model(arch, model_class)
            MODELS_CONFIG_MAP[arch] = BlockDiffusionConfigHook

    import engine_patches

    engine_patches.apply_all()
