"""A real ``vllm serve`` process on a free port, and clients for it (shared by the serving and
distributed tests)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_serve(model: Path, log: Path, extra_args: tuple[str, ...] = ()):
    """``vllm serve MODEL [extra_args]`` on a free port; yields the base URL, stops the server afterwards."""
    port = free_port()
    cli = Path(sys.executable).with_name("vllm")
    cmd = [str(cli) if cli.exists() else "vllm", "serve", str(model), "--port", str(port),
           "--max-model-len", "1024", "--kv-cache-memory-bytes", str(256 << 20),
           "--dtype", "float32", "--enforce-eager", "--seed", "0", *extra_args]
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


def openai_client(base: str):
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=300)


def stream_choices(base: str, payload: dict) -> list[dict]:
    """POST a streamed /v1/completions request; every chunk's first choice, in order."""
    chunks = []
    with requests.post(f"{base}/v1/completions", json=dict(payload, stream=True), stream=True, timeout=300) as resp:
        assert resp.status_code == 200, resp.text
        for line in resp.iter_lines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                chunks.append(json.loads(line[6:])["choices"][0])
    return chunks
