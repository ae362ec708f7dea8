"""Ray-distributed serving on CPU: tensor parallelism over the package's local Ray cluster, through
the offline ``LLM`` and through ``vllm serve -tp 2 --distributed-executor-backend ray`` over HTTP.

vLLM refuses Ray on its CPU platform upstream; ``engine_patches/cpu_platform.py`` and
``ray_executor_v2.py`` let its Ray executor place CPU workers (gloo between them). Each Ray worker
loads the plugin by entry point like any vLLM process (the worker class is ours). Outputs must be
the single-worker outputs, which the reference decoders define, token for token.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import requests

from tests.conftest import make_llm, random_prompt, truncate_at_stop
from tests.reference import load_reference_model
from tests.reference.bd3lm_reference import generate_bd3lm
from tests.serving.server import stream_choices, vllm_serve


def tensor_parallel_llm(ckpt):
    return make_llm(ckpt, tensor_parallel_size=2, distributed_executor_backend="ray", max_model_len=512,
                    kv_cache_memory_bytes=128 << 20)


def test_bd3lm_tensor_parallel_over_ray_is_the_single_worker_output(ray_cluster, bd3lm_ckpt, reference_threads):
    from vllm import SamplingParams

    rng = random.Random(0)
    # The card's schedule and both parallel rules (low values: this random model is never confident).
    rules = [{}, {"threshold": 0.004}, {"factor": 3.0}] * 2
    prompts = [random_prompt(rng, rng.randint(3, 60)) for _ in rules]
    llm = tensor_parallel_llm(bd3lm_ckpt)
    try:
        assert llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend == "ray"
        params = [SamplingParams(max_tokens=40, temperature=0.0, extra_args={"steps": 20, "block_size": 16, **rule})
                  for rule in rules]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
    model = load_reference_model(bd3lm_ckpt)
    for rule, prompt, out in zip(rules, prompts, outs):
        forwards = []
        expected = generate_bd3lm(model, prompt, max_new_tokens=40, steps=20, block_size=16, eos_ids=(151645,),
                                  forwards=forwards, **rule)
        assert list(out.outputs[0].token_ids) == truncate_at_stop(expected)
        # Per-step commit counts ride the runner's output through the Ray executor.
        assert sum(out.outputs[0].spec_decode_metrics.histogram) == forwards[0]


def test_sdlm_tensor_parallel_over_ray_is_the_single_worker_output(ray_cluster, sdlm4_ckpt, reference_threads):
    from tests.engine.sdlm_cases import SDLMCase, assert_matches_reference

    rng = random.Random(1)
    cases = [SDLMCase(24, "prob_conf", 0.3), SDLMCase(24, "entropy_conf", 0.9), SDLMCase(24, "self_speculative"),
             SDLMCase(24, "prob_conf", 0.0), SDLMCase(24, "prob_conf", 0.6, temperature=0.8, seed=5)]
    prompts = [random_prompt(rng, rng.randint(3, 60)) for _ in cases]
    llm = tensor_parallel_llm(sdlm4_ckpt)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], [c.params() for c in cases], use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
    model = load_reference_model(sdlm4_ckpt)
    for case, prompt, out in zip(cases, prompts, outs):
        assert_matches_reference(out.outputs[0], case.reference(model, prompt, 4)[0], case.max_tokens)


TENSOR_PARALLEL_OVER_RAY = ("--tensor-parallel-size", "2", "--distributed-executor-backend", "ray")


def complete_concurrently(base: str, bodies: list[dict]) -> list[SimpleNamespace]:
    """POST every body to /v1/completions at once (so the server batches them); the choices' token ids."""

    def post(body):
        r = requests.post(f"{base}/v1/completions", json=dict(body, return_token_ids=True), timeout=300)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return SimpleNamespace(token_ids=choice["token_ids"], finish_reason=choice["finish_reason"])

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, bodies))


def test_bd3lm_vllm_serve_tensor_parallel_over_ray(ray_cluster, bd3lm_ckpt, tmp_path, reference_threads):
    rng = random.Random(2)
    prompts = [random_prompt(rng, rng.randint(3, 60)) for _ in range(4)]
    with vllm_serve(bd3lm_ckpt, tmp_path / "serve.log", TENSOR_PARALLEL_OVER_RAY) as base:
        outs = complete_concurrently(base, [
            dict(model=str(bd3lm_ckpt), prompt=p, max_tokens=40, temperature=0.0,
                 vllm_xargs={"steps": 20, "block_size": 16}) for p in prompts])
    log = (tmp_path / "serve.log").read_text()
    assert "RayWorkerProc" in log and "world_size=2" in log  # two Ray workers, not a silent fallback
    model = load_reference_model(bd3lm_ckpt)
    for prompt, out in zip(prompts, outs):
        expected = generate_bd3lm(model, prompt, max_new_tokens=40, steps=20, block_size=16, eos_ids=(151645,))
        assert out.token_ids == truncate_at_stop(expected)


def test_sdlm_vllm_serve_tensor_parallel_over_ray(ray_cluster, sdlm4_ckpt, tmp_path, reference_threads):
    from tests.engine.sdlm_cases import SDLMCase, assert_matches_reference

    rng = random.Random(3)
    cases = [SDLMCase(24, "prob_conf", 0.3), SDLMCase(24, "self_speculative"),
             SDLMCase(24, "prob_conf", 0.6, temperature=0.8, seed=5)]
    prompts = [random_prompt(rng, rng.randint(3, 60)) for _ in cases]
    bodies = [dict(model=str(sdlm4_ckpt), prompt=p, max_tokens=c.max_tokens, temperature=c.temperature, seed=c.seed,
                   vllm_xargs={k: v for k, v in (("alg", c.alg), ("threshold", c.threshold)) if v is not None})
              for c, p in zip(cases, prompts)]
    with vllm_serve(sdlm4_ckpt, tmp_path / "serve.log", TENSOR_PARALLEL_OVER_RAY) as base:
        outs = complete_concurrently(base, bodies)
        # Trace frames ride the runner's output through the Ray executor too.
        traced = dict(bodies[0], vllm_xargs=dict(bodies[0]["vllm_xargs"], trace=True))
        chunks = stream_choices(base, traced)
    model = load_reference_model(sdlm4_ckpt)
    for case, prompt, out in zip(cases, prompts, outs):
        assert_matches_reference(out, case.reference(model, prompt, 4)[0], case.max_tokens)
    frames = [c["blockdiff_trace"][0] for c in chunks if "blockdiff_trace" in c]
    assert [f["step"] for f in frames] == list(range(1, len(frames) + 1))
    assert sum(f["accepted"] for f in frames) >= len(outs[0].token_ids) - 1  # a final eos may end a window early
