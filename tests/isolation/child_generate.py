"""Child process for ``test_plugin_is_inert.py``: greedy-generate with each given checkpoint, print JSON.

    python -m tests.isolation.child_generate CKPT [CKPT ...]

Prints one JSON line: the generated token ids per checkpoint, and what this process imported.
"""

from __future__ import annotations

import json
import sys


def main(paths: list[str]) -> None:
    from vllm import LLM, SamplingParams

    prompts = [{"prompt_token_ids": [11, 22, 33, 44, 55]}, {"prompt_token_ids": list(range(100, 140))}]
    results = {}
    for path in paths:
        llm = LLM(model=path, dtype="float32", max_model_len=512, kv_cache_memory_bytes=128 << 20,
                  enforce_eager=True, seed=0)
        outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0), use_tqdm=False)
        results[path] = [list(o.outputs[0].token_ids) for o in outs]
        llm.llm_engine.engine_core.shutdown()
        del llm
    report = {
        "tokens": results,
        "ray_importable": _importable("ray"),
        "imported": sorted(m for m in sys.modules if m.startswith(("engine_patches.", "vllm_blockdiff"))),
    }
    print("RESULT " + json.dumps(report))


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    main(sys.argv[1:])
