"""BD3LM through vLLM's default subprocess engine: plugin loaded by entry point in the engine process.

Runs after ``test_bd3lm_engine.py`` (whose in-process engine must be gone first: shutting a
subprocess engine down tears down this process's model-parallel state).
"""

from __future__ import annotations

import random
import subprocess
import sys

from tests.conftest import EOS_ID, make_llm, random_prompt
from tests.engine.test_bd3lm_engine import Case, _run
from tests.reference import load_reference_model


def test_eos_stops_mid_block_with_untied_head(bd3lm_eos_ckpt, reference_threads):
    """Subprocess engine, prefix caching off, a 100-token step budget (prompts prefill in chunks that
    end inside a block), and a checkpoint storing lm_head beside tie_word_embeddings: true."""
    model = load_reference_model(bd3lm_eos_ckpt)
    llm = make_llm(bd3lm_eos_ckpt, enable_prefix_caching=False, max_num_batched_tokens=100, max_num_seqs=8)
    try:
        rng = random.Random(0)
        prompts = [random_prompt(rng, rng.randrange(3, 60)) for _ in range(16)]
        case = Case(0, 64, steps=32)
        outs = _run(llm, prompts, case.params())
        expected = [case.reference(model, p) for p in prompts]
        assert outs == expected
        stopped_early = [o for o in outs if len(o) < 64]
        assert stopped_early and all(o[-1] == EOS_ID for o in stopped_early)
        # Shared-prefix prompts without the cache, longer than the step budget: prefilled in chunks
        # of <= 100 tokens, each rolled back to its last whole block, then denoised exactly.
        prefix = random_prompt(rng, 150)
        shared = [prefix + random_prompt(rng, n) for n in (0, 5, 77)]
        assert _run(llm, shared, Case(0, 40).params()) == [Case(0, 40).reference(model, p) for p in shared]
        # Guidance: the shared all-mask prefix (up to the 256-token page here) is filled in chunks
        # of at most 32 tokens (half the step budget, whole blocks) over several steps first.
        guided = Case(0, 24, steps=12, cfg_scale=1.5)
        long_prompts = [random_prompt(rng, 270), random_prompt(rng, 20)]
        assert _run(llm, long_prompts, guided.params()) == [guided.reference(model, p) for p in long_prompts]
    finally:
        llm.llm_engine.engine_core.shutdown()




def test_without_the_plugin_vllm_cannot_serve_the_checkpoint(bd3lm_ckpt):
    """Negative twin: with our entry point filtered out, vLLM cannot even parse the a2d-qwen2 config."""
    code = f"from vllm import LLM; LLM(model={str(bd3lm_ckpt)!r}, enforce_eager=True, max_model_len=256)"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**__import__("os").environ, "VLLM_PLUGINS": "lora_filesystem_resolver"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    # The hub config's auto_map points at remote code that imports the dllm package.
    assert "trust_remote_code" in proc.stderr
