"""GPU worker that builds our model runner on vLLM's V1 GPU runner (``VLLM_USE_V2_MODEL_RUNNER=0``)."""

from __future__ import annotations

from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from vllm_blockdiff.engine.runner import BlockDiffRunnerMixin


class BlockDiffGPUModelRunner(BlockDiffRunnerMixin, GPUModelRunner):
    pass


class BlockDiffGPUWorker(Worker):
    def _make_model_runner(self):
        # Worker._make_model_runner is the upstream factory hook for exactly this.
        return BlockDiffGPUModelRunner(self.vllm_config, self.device)
