"""Child for ``test_vllm033.py``: build the Ray Serve LLM app of ``vllm_blockdiff.ray_serve`` on whichever vLLM
is importable (no Serve instance is started). ``--no-alias`` skips ``vllm_import_aliases`` to show it is needed.

    python -m tests.compat.ray_build CKPT [--no-alias]
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from vllm_blockdiff import ray_serve

    if "--no-alias" in sys.argv:
        ray_serve.vllm_import_aliases = lambda: None
    try:
        app = ray_serve.build_app({"model": sys.argv[1], "num_replicas": "1", "max_model_len": "256"})
        print("RESULT built", type(app).__name__)
    except ImportError as err:
        print("RESULT import error", err)
