"""vllm_blockdiff: serve block-diffusion language models (BD3LM, SDLM) with vLLM.

``register()`` is the ``vllm.general_plugins`` entry point; vLLM calls it in every process
(API server, engine core, workers), so everything here must be cheap and idempotent.
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
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from vllm_blockdiff.config import BD3LM_ARCHITECTURES, SDLM_ARCHITECTURES, BlockDiffusionConfigHook
    from vllm_blockdiff.models.bd3lm import A2DQwen2Config

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
