"""Workers that build our model runner instead of vLLM's (selected by ``parallel_config.worker_cls``)."""

from __future__ import annotations

import contextlib

from vllm.v1.worker import cpu_worker as _cpu_worker_module
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_blockdiff.engine.runner import BlockDiffRunnerMixin


class BlockDiffCPUModelRunner(BlockDiffRunnerMixin, CPUModelRunner):
    pass


@contextlib.contextmanager
def _swapped(module, name: str, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


class BlockDiffCPUWorker(CPUWorker):
    def init_device(self):
        # CPUWorker.init_device constructs ``CPUModelRunner`` by its module-level name.
        with _swapped(_cpu_worker_module, "CPUModelRunner", BlockDiffCPUModelRunner):
            super().init_device()
        if not isinstance(self.model_runner, BlockDiffRunnerMixin):
            raise RuntimeError("vllm_blockdiff needs the V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0)")


def _gpu_worker_cls():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    class BlockDiffGPUModelRunner(BlockDiffRunnerMixin, GPUModelRunner):
        pass

    class BlockDiffGPUWorker(Worker):
        def _make_model_runner(self):
            return BlockDiffGPUModelRunner(self.vllm_config, self.device)

    return BlockDiffGPUWorker


def __getattr__(name: str):
    # The GPU worker imports CUDA-only modules; build it only when asked for.
    if name == "BlockDiffGPUWorker":
        return _gpu_worker_cls()
    raise AttributeError(name)
