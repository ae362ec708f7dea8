"""The plugin's schedulers against vLLM 0.33's scheduler code, and Ray Serve LLM on 0.33.

There is no CPU build of 0.33, but its scheduler and KV-cache manager are pure Python: the sources of its
CUDA wheel (``scripts/install.sh`` unpacks them to ``.cache/vllm-0.33.0``) run on this machine's torch with
``VLLM_TARGET_DEVICE=cpu`` in a child process (``drive_scheduler.py``, which plays the model runner).

What 0.33 changed for us: ``Scheduler.update_from_output`` calls ``kv_cache_manager.cache_blocks(...)``
after appending a step's tokens whenever ``num_spec_tokens > 0``. SDLM's old bound (``num_tokens - 1`` at
call time) then let vLLM hash pages still holding window KV; the bound is now the step's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = Path(os.environ.get("VLLM_033_SOURCES", REPO / ".cache" / "vllm-0.33.0"))


def _child(module: str, *args: str, vllm033: bool) -> dict | str:
    env = dict(os.environ, VLLM_PLUGINS="")  # the drivers register the plugin themselves
    path = [str(REPO)]
    if vllm033:
        missing = f"vLLM 0.33 sources missing at {SOURCES}: run scripts/install.sh"
        assert (SOURCES / "vllm" / "__init__.py").exists(), missing
        path.insert(0, str(SOURCES))
        env["VLLM_TARGET_DEVICE"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(path)
    proc = subprocess.run([sys.executable, "-m", module, *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    line = next((line for line in proc.stdout.splitlines() if line.startswith("RESULT ")), None)
    assert line is not None, proc.stderr[-3000:]
    body = line[len("RESULT "):]
    return json.loads(body) if body.startswith("{") else body


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from vllm_blockdiff.testing.tiny_checkpoints import build_bd3lm_checkpoint, build_sdlm_checkpoint

    root = tmp_path_factory.mktemp("compat")
    return {"sdlm": build_sdlm_checkpoint(root / "sdlm", D=4), "bd3lm": build_bd3lm_checkpoint(root / "bd3lm")}


@pytest.mark.parametrize("vllm033", [False, True], ids=["vllm-0.32", "vllm-0.33"])
@pytest.mark.parametrize("family", ["sdlm", "bd3lm"])
def test_only_final_kv_is_ever_hashed(ckpts, family, vllm033):
    result = _child("tests.compat.drive_scheduler", str(ckpts[family]), family, vllm033=vllm033)
    assert result["vllm"].startswith("0.33" if vllm033 else "0.32")
    assert result["num_tokens"] == 75 + 200 and result["steps"] > 50
    assert result["num_violations"] == 0, result["violations"]
    if family == "sdlm":  # the call 0.33 added fires after every window step, and is bounded
        assert (result["cache_blocks_after_append"] > 0) == vllm033
    else:  # BD3LM keeps num_spec_tokens = 0: 0.33 never calls it there
        assert result["cache_blocks_after_append"] == 0


@pytest.mark.parametrize("vllm033", [False, True], ids=["vllm-0.32", "vllm-0.33"])
def test_the_bound_before_0_33_is_unsafe_on_0_33_only(ckpts, vllm033):
    result = _child("tests.compat.drive_scheduler", str(ckpts["sdlm"]), "sdlm", "--old-bound", vllm033=vllm033)
    assert (result["num_violations"] > 0) == vllm033, result
    if vllm033:
        assert all(v["at"] == "update_from_output" for v in result["violations"])


def test_ray_serve_llm_app_builds_on_0_33(ckpts):
    assert _child("tests.compat.ray_build", str(ckpts["sdlm"]), vllm033=True).startswith("built")
    # Without the alias Ray 2.60 cannot import what 0.33 moved.
    assert "cli_args" in _child("tests.compat.ray_build", str(ckpts["sdlm"]), "--no-alias", vllm033=True)
    assert _child("tests.compat.ray_build", str(ckpts["sdlm"]), vllm033=False).startswith("built")
