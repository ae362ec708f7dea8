#!/usr/bin/env bash
# The GPU checks and benchmarks of the hot-path issue, in one go, on a machine with a CUDA GPU (run from the
# repository root, vLLM for CUDA and this package installed: `pip install -e ".[gpu,test]"`, or the offline
# bundle as in scripts/gpu_bench.sh). Prints every table the README's GPU rows come from.
set -euo pipefail
export PYTHONUNBUFFERED=1 VLLM_ENABLE_V1_MULTIPROCESSING=${VLLM_ENABLE_V1_MULTIPROCESSING:-1}
echo "== SDLM on GPU, fp32: outputs against the reference (the 'same as ref' column must be n/n)"
for alg in prob_conf entropy_conf self_speculative; do
  python benchmarks/bench_sdlm.py --device cuda --dtype float32 --model letters --alg "$alg" --threshold 0.9 \
    --concurrency 1 8 --new-tokens 64
done
echo "== SDLM on GPU, bf16: agreement with the reference, tokens/s against vLLM AR (0.5B and 3B shapes)"
for shape in qwen2.5-0.5b qwen2.5-3b; do
  python benchmarks/bench_sdlm.py --device cuda --dtype bfloat16 --model "$shape" --threshold 0.0 \
    --concurrency 1 32 --prompt-len 128 --new-tokens 256
done
echo "== BD3LM at the card's defaults: against the reference and vLLM AR (0.5B shape, bf16, CUDA graphs)"
python benchmarks/bench_bd3lm.py --device cuda --dtype bfloat16 --shape qwen2.5-0.5b --concurrency 1 32 64 \
  --prompt-len 128 --new-tokens 256
echo "== BD3LM parallel decoding on the trained model (quality vs speed)"
python benchmarks/bench_bd3lm_parallel.py --device cuda --json /tmp/bd3lm_parallel_gpu.json \
  --plot /tmp/bd3lm_parallel_gpu.png
echo "== BD3LM structured outputs (left frontier) against free decoding"
python benchmarks/bench_bd3lm_structured.py --device cuda
echo "== Engine cost per step against vLLM AR (tiny model)"
python benchmarks/bench_hotpath.py --concurrency 1 8 32 64
