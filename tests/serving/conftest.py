"""Real ``vllm serve`` processes shared by the serving tests (one per family, for the whole package)."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_serve(model: Path, log: Path):
    """``vllm serve MODEL`` on a free port; yields the base URL, stops the server afterwards."""
    port = _free_port()
    cli = Path(sys.executable).with_name("vllm")
    cmd = [str(cli) if cli.exists() else "vllm", "serve", str(model), "--port", str(port),
           "--max-model-len", "1024", "--kv-cache-memory-bytes", str(256 << 20),
           "--dtype", "float32", "--enforce-eager", "--seed", "0"]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            if time.time() > deadline:
                raise TimeoutError(f"vllm serve did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def kv_cache_usage(base: str) -> float:
    text = requests.get(f"{base}/metrics", timeout=10).text
    return float(re.search(r"^vllm:kv_cache_usage_perc\{[^}]*\} (\S+)$", text, re.M).group(1))


@pytest.fixture(scope="package")
def bd3lm_server(bd3lm_ckpt, tmp_path_factory):
    with vllm_serve(bd3lm_ckpt, tmp_path_factory.mktemp("logs") / "bd3lm.log") as base:
        yield base


def openai_client(base: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=300)


@pytest.fixture(scope="package")
def bd3lm_client(bd3lm_server):
    return openai_client(bd3lm_server)


@pytest.fixture(scope="package")
def letters_ckpt(tmp_path_factory):
    from vllm_blockdiff.testing.trained_sdlm import build_trained_sdlm_checkpoint

    return build_trained_sdlm_checkpoint(tmp_path_factory.mktemp("sdlm_letters_serve"), D=4)


@pytest.fixture(scope="package")
def sdlm_server(letters_ckpt, tmp_path_factory):
    with vllm_serve(letters_ckpt, tmp_path_factory.mktemp("logs") / "sdlm.log") as base:
        yield base


@pytest.fixture(scope="package")
def sdlm_client(sdlm_server):
    return openai_client(sdlm_server)


