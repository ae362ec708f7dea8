"""Data parallelism through Ray Serve LLM: two independent replicas of the plugin's engine behind
one OpenAI endpoint (``vllm_blockdiff/ray_serve.py`` says why Serve rather than vLLM's own
``--data-parallel-size``). Requests spread over both replicas and get the single-worker outputs;
killing one replica mid-load leaves the other answering while Serve replaces the dead one.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import ray
import requests

from tests.conftest import random_prompt, truncate_at_stop
from tests.reference import load_reference_model
from tests.reference.bd3lm_reference import generate_bd3lm
from tests.serving.server import free_port

MODEL_ID = "tiny-bd3lm"
DEPLOYMENT = f"LLMServer:{MODEL_ID}"
STEPS, BLOCK, MAX_TOKENS = 16, 16, 32
PROMPTS = [random_prompt(random.Random(4), n) for n in (3, 9, 17, 25, 33, 41)]


@pytest.fixture(scope="module")
def serve_app(ray_cluster, bd3lm_ckpt):
    from ray import serve

    from vllm_blockdiff.ray_serve import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # The arguments `serve run vllm_blockdiff.ray_serve:build_app key=value ...` would pass.
    app = build_app({"model": str(bd3lm_ckpt), "model_id": MODEL_ID, "num_replicas": "2", "dtype": "float32",
                     "max_model_len": "512", "kv_cache_memory_bytes": str(128 << 20), "enforce_eager": "true",
                     "seed": "0"})
    serve.run(app, blocking=False)  # returns once every replica is up
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        ray_cluster.track_processes()  # the replicas and their engine cores must be gone at the end too
        serve.shutdown()


@pytest.fixture(scope="module")
def expected(bd3lm_ckpt, reference_threads) -> list[list[int]]:
    model = load_reference_model(bd3lm_ckpt)
    return [truncate_at_stop(generate_bd3lm(model, p, max_new_tokens=MAX_TOKENS, steps=STEPS, block_size=BLOCK,
                                            eos_ids=(151645,))) for p in PROMPTS]


@dataclass
class Outcome:
    prompt: int
    started: float
    ended: float
    status: int
    token_ids: list[int] | None
    error: str = ""


def complete(base: str, prompt: int) -> Outcome:
    started = time.time()
    body = dict(model=MODEL_ID, prompt=PROMPTS[prompt], max_tokens=MAX_TOKENS, temperature=0.0,
                return_token_ids=True, vllm_xargs={"steps": STEPS, "block_size": BLOCK})
    try:
        r = requests.post(f"{base}/v1/completions", json=body, timeout=300)
    except requests.RequestException as e:
        return Outcome(prompt, started, time.time(), -1, None, repr(e))
    ok = r.status_code == 200
    return Outcome(prompt, started, time.time(), r.status_code, r.json()["choices"][0]["token_ids"] if ok else None,
                   "" if ok else r.text[:300])


def complete_concurrently(base: str, count: int) -> list[Outcome]:
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda i: complete(base, i % len(PROMPTS)), range(count)))


def replica_ids() -> set[str]:
    """Serve names each replica actor ``SERVE_REPLICA::app#deployment#replica_id``."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    return {n.rsplit("#", 1)[1] for n in names if n.startswith("SERVE_REPLICA::") and f"#{DEPLOYMENT}#" in n}


def finished_requests_per_replica(metrics_url: str) -> dict[str, float]:
    """vLLM's ``request_success`` counter of every replica, from Ray's Prometheus endpoint."""
    counts: dict[str, float] = defaultdict(float)
    text = requests.get(metrics_url, timeout=10).text
    for line in text.splitlines():
        if line.startswith("ray_vllm_request_success_total{"):
            replica = re.search(r'ReplicaId="([^"]+)"', line).group(1)
            counts[replica] += float(line.rsplit(" ", 1)[1])
    return counts


def wait_for_finished_counts(metrics_url: str, before: dict[str, float], total: int) -> dict[str, float]:
    """Per-replica finished requests since ``before``, once ``total`` have been reported (metrics are
    exported every few seconds)."""
    deadline = time.time() + 90
    while True:
        now = finished_requests_per_replica(metrics_url)
        delta = {r: n - before.get(r, 0.0) for r, n in now.items() if n > before.get(r, 0.0)}
        if sum(delta.values()) >= total or time.time() > deadline:
            return delta
        time.sleep(2)


def assert_single_worker_outputs(outcomes: list[Outcome], expected: list[list[int]]) -> None:
    for o in outcomes:
        assert o.status == 200, o.error
        assert o.token_ids == expected[o.prompt]


def test_requests_spread_over_both_replicas_with_single_worker_outputs(serve_app, ray_cluster, expected):
    replicas = replica_ids()
    assert len(replicas) == 2
    before = finished_requests_per_replica(ray_cluster.metrics_url)
    outcomes = complete_concurrently(serve_app, 16)
    assert_single_worker_outputs(outcomes, expected)
    served = wait_for_finished_counts(ray_cluster.metrics_url, before, 16)
    assert sum(served.values()) == 16
    assert set(served) == replicas, served  # both replicas answered some


def test_killing_a_replica_mid_load_leaves_the_other_answering(serve_app, ray_cluster, expected):
    from ray import serve

    replicas = sorted(replica_ids())
    assert len(replicas) == 2
    victim, survivor = replicas
    outcomes: list[Outcome] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        i = worker
        while not stop.is_set():
            outcomes.append(complete(serve_app, i % len(PROMPTS)))
            i += 1

    workers = [threading.Thread(target=load, args=(w,)) for w in range(6)]
    for w in workers:
        w.start()
    try:
        while len(outcomes) < 6:  # load is on both replicas
            time.sleep(0.2)
        ray.kill(ray.get_actor(f"SERVE_REPLICA::default#{DEPLOYMENT}#{victim}", namespace="serve"), no_restart=True)
        killed_at = time.time()
        deadline = killed_at + 120
        while sum(o.started > killed_at for o in outcomes) < 12 and time.time() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        for w in workers:
            w.join()

    after = [o for o in outcomes if o.started > killed_at]
    assert len(after) >= 12
    assert_single_worker_outputs(after, expected)  # the survivor answered everything sent after the kill
    # Only requests the victim had accepted before it died may fail, and they fail with an error
    # response rather than hanging.
    failed = [o for o in outcomes if o.status != 200]
    assert all(o.started < killed_at < o.ended and o.status >= 500 for o in failed), failed
    assert_single_worker_outputs([o for o in outcomes if o.status == 200], expected)

    # Serve replaces the dead replica; then both answer again. (Serve's status can still read
    # "2 running" before the controller has noticed the death: wait for the new replica's actor too.)
    deadline = time.time() + 300
    while True:
        replacement = replica_ids() - {survivor, victim}
        deployment = serve.status().applications["default"].deployments[DEPLOYMENT]
        if replacement and deployment.status == "HEALTHY" and deployment.replica_states.get("RUNNING") == 2:
            break
        assert time.time() < deadline, (deployment, replica_ids())
        time.sleep(2)
    assert replica_ids() == replacement | {survivor} and len(replacement) == 1
    before = finished_requests_per_replica(ray_cluster.metrics_url)
    outcomes = complete_concurrently(serve_app, 16)
    assert_single_worker_outputs(outcomes, expected)
    served = wait_for_finished_counts(ray_cluster.metrics_url, before, 16)
    # (The survivor's counts may include kill-phase requests exported late; the replacement's cannot.)
    assert replacement <= set(served) and sum(served.values()) >= 16, served


def test_build_app_reads_cli_values_as_engine_arguments():
    from vllm_blockdiff.ray_serve import _parse, build_app, llm_config

    assert [_parse(v) for v in ("2", "0.5", "true", "float32", "/ckpt")] == [2, 0.5, True, "float32", "/ckpt"]
    config = llm_config("/ckpt", num_replicas=3, tensor_parallel_size=2, max_model_len=512)
    assert config.model_id == "/ckpt" and config.deployment_config["num_replicas"] == 3
    assert config.engine_kwargs == {"tensor_parallel_size": 2, "max_model_len": 512}
    # A CPU-only vLLM: one Ray CPU per worker (Ray Serve LLM then picks its CPU accelerator).
    assert config.placement_group_config["bundles"] == [{"CPU": 1}, {"CPU": 1}]
    with pytest.raises(ValueError, match="model="):
        build_app({"num_replicas": "2"})
