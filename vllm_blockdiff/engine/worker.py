"""CPU worker that builds our model runner instead of vLLM's (selected by ``parallel_config.worker_cls``).

The GPU twin is ``gpu_worker``; each imports only its own platform's modules.
"""

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
