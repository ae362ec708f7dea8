"""The plugin changes nothing for models that are not ours and never fails where Ray is missing.

Child processes (``child_generate.py``) run real engines: one with Ray made unimportable
(``sys.modules["ray"] = None`` from a ``sitecustomize`` on ``PYTHONPATH``, inherited by the engine
process), one with the plugin switched off (``VLLM_PLUGINS=""``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run_child(paths: list[Path], tmp_path: Path, *, block_ray: bool, plugins: str | None = None) -> dict:
    env = dict(os.environ)
    python_path = [str(REPO)]
    if block_ray:
        blocker = tmp_path / "no_ray"
        blocker.mkdir(exist_ok=True)
        (blocker / "sitecustomize.py").write_text('import sys\nsys.modules["ray"] = None  # "not installed"\n')
        python_path.insert(0, str(blocker))
    env["PYTHONPATH"] = os.pathsep.join(python_path + [env.get("PYTHONPATH", "")])
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    proc = subprocess.run([sys.executable, "-m", "tests.isolation.child_generate", *map(str, paths)], env=env,
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory):
    from tests.plain_model import build_plain_qwen2

    return build_plain_qwen2(tmp_path_factory.mktemp("plain_qwen2"))


@pytest.fixture(scope="module")
def without_ray(plain_ckpt, bd3lm_ckpt, sdlm4_ckpt, tmp_path_factory):
    return _run_child([plain_ckpt, bd3lm_ckpt, sdlm4_ckpt], tmp_path_factory.mktemp("child"), block_ray=True)


def test_everything_serves_without_ray(without_ray, plain_ckpt, bd3lm_ckpt, sdlm4_ckpt):
    assert without_ray["ray_importable"] is False
    for ckpt in (plain_ckpt, bd3lm_ckpt, sdlm4_ckpt):
        assert all(len(t) == 12 or t[-1] in (151643, 151645) for t in without_ray["tokens"][str(ckpt)])
    # The Ray patches were never imported; neither were the server-side patches in an offline process.
    assert not [m for m in without_ray["imported"] if "ray" in m or "serving" in m]


def test_plain_model_output_is_the_same_without_the_plugin(without_ray, plain_ckpt, tmp_path):
    stock = _run_child([plain_ckpt], tmp_path, block_ray=False, plugins="")
    assert not stock["imported"]  # the plugin did not load at all
    assert stock["tokens"][str(plain_ckpt)] == without_ray["tokens"][str(plain_ckpt)]


def test_our_models_match_the_references_without_ray(without_ray, bd3lm_ckpt, sdlm4_ckpt, reference_threads):
    from tests.conftest import EOS_ID, truncate_at_stop
    from tests.reference import load_reference_model
    from tests.reference.bd3lm_reference import generate_bd3lm
    from tests.reference.sdlm_reference import generate_sdlm

    prompts = [[11, 22, 33, 44, 55], list(range(100, 140))]
    model = load_reference_model(bd3lm_ckpt)
    expected = [truncate_at_stop(generate_bd3lm(model, p, max_new_tokens=12, steps=12, eos_ids=(EOS_ID,)))
                for p in prompts]
    assert without_ray["tokens"][str(bd3lm_ckpt)] == expected
    model = load_reference_model(sdlm4_ckpt)
    for prompt, got in zip(prompts, without_ray["tokens"][str(sdlm4_ckpt)]):
        tokens, _ = generate_sdlm(model, prompt, max_new_tokens=12, D=4, threshold=0.5)
        assert [t for t in got if t not in (151643, 151645)] == tokens
