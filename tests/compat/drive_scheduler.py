"""Drive the plugin's schedulers on whichever vLLM is importable, with a scripted runner, and check what
the prefix cache hashes.

    [PYTHONPATH=<vllm 0.33 sources>] python -m tests.compat.drive_scheduler CKPT sdlm|bd3lm [--old-bound]

vLLM's scheduler and KV-cache manager are pure Python, so 0.33's run here on the CPU build's torch
(the sources of the CUDA wheel on ``PYTHONPATH``, ``VLLM_TARGET_DEVICE=cpu``; nothing compiled is
loaded). No model runs: each step the script plays the runner, committing 1..D window tokens (SDLM) or a
chunk every few steps (BD3LM), and models which KV slots hold committed tokens' final KV:

- SDLM: a step computes causal KV up to ``x_{L-2}`` (the window rewrites slot ``L-1``), so after it at most
  ``L - 1`` leading slots are final;
- BD3LM: only slots of diffusion blocks re-encoded clean (all committed tokens before the current chunk's
  block) are final.

After every ``schedule()`` and ``update_from_output()`` the number of pages the request has hashed is
checked against that bound. ``--old-bound`` replaces the plugin's SDLM bound by the one it had before
vLLM 0.33 (``num_tokens - 1`` at call time) to show why it had to change. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys


def build(ckpt: str, family: str):
    import torch
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    import vllm_blockdiff

    vllm_blockdiff.register()
    max_model_len = 512
    model_config = ModelConfig(model=ckpt, dtype="float32", seed=0, max_model_len=max_model_len, hf_overrides={})
    scheduler_config = SchedulerConfig(max_model_len=max_model_len, is_encoder_decoder=False, max_num_seqs=8,
                                       max_num_batched_tokens=512, enable_chunked_prefill=True)
    cache_config = CacheConfig(enable_prefix_caching=True)
    vllm_config = VllmConfig(model_config=model_config, scheduler_config=scheduler_config,
                             cache_config=cache_config)
    page = vllm_config.cache_config.block_size  # chosen by the plugin's config hook
    num_blocks = 1024
    cache_config.num_gpu_blocks = num_blocks
    kv_cache_config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec(["layer"], FullAttentionSpec(block_size=page, num_kv_heads=1, head_size=32,
                                                      dtype=torch.float32))])
    cls = resolve_obj_by_qualname(vllm_config.scheduler_config.scheduler_cls)
    scheduler = cls(vllm_config=vllm_config, kv_cache_config=kv_cache_config,
                    structured_output_manager=StructuredOutputManager(vllm_config), block_size=page,
                    hash_block_size=page, log_stats=True)
    hash_fn = get_hash_fn_by_name(vllm_config.cache_config.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    return scheduler, get_request_block_hasher(page, hash_fn), page, vllm_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ckpt")
    parser.add_argument("family", choices=["sdlm", "bd3lm"])
    parser.add_argument("--old-bound", action="store_true")
    args = parser.parse_args()

    import vllm
    from vllm.sampling_params import SamplingParams
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request

    scheduler, hasher, page, vllm_config = build(args.ckpt, args.family)
    coordinator = scheduler.kv_cache_manager.coordinator
    calls_after_append = []
    wrapped = coordinator.cache_blocks
    if args.old_bound:
        original = type(coordinator).cache_blocks.__get__(coordinator)

        def wrapped(request, num_tokens):  # the plugin's bound before 0.33
            original(request, min(num_tokens, request.num_tokens - 1))

    def recording(request, num_tokens):
        if any(frame.f_code.co_name == "update_from_output" for frame in _stack()):
            calls_after_append.append(num_tokens)
        wrapped(request, num_tokens)

    coordinator.cache_blocks = recording

    extra = {"block_size": 16, "steps": 16} if args.family == "bd3lm" else {"threshold": 0.5}
    request = Request(request_id="r0", prompt_token_ids=list(range(1000, 1000 + 75)),
                      sampling_params=SamplingParams(max_tokens=200, ignore_eos=True, extra_args=extra),
                      pooling_params=None, block_hasher=hasher)
    scheduler.add_request(request)
    manager = coordinator.single_type_managers[0]
    D = vllm_config.model_config.hf_config.blockdiff_block_size
    pattern = [1, 3, 2, D, 1, D, 2]
    violations, steps, next_token, final = [], 0, 5000, 0
    block = extra.get("block_size", 0)
    while not request.is_finished() and steps < 120:
        L_before, computed_before = request.num_tokens, request.num_computed_tokens
        out = scheduler.schedule()
        num_scheduled = out.num_scheduled_tokens.get("r0", 0)
        placeholders = out.scheduled_spec_decode_tokens.get("r0", [])
        if args.family == "sdlm":
            final = min(computed_before + num_scheduled, L_before - 1)
            n = pattern[steps % len(pattern)] if placeholders else 0
        else:
            # A chunk commits every fourth step (its slots: the placeholders); what is before the chunk's
            # block start was re-encoded clean by then.
            n = len(placeholders) if placeholders and steps % 4 == 3 else 0
            chunk_start = L_before
            final = max(final, chunk_start - chunk_start % block if placeholders else 0)
        check = _checker(manager, page, violations)
        check("schedule", final)
        sampled = list(range(next_token, next_token + n))
        next_token += n
        runner_output = ModelRunnerOutput(req_ids=list(out.num_scheduled_tokens),
                                          req_id_to_index={r: i for i, r in enumerate(out.num_scheduled_tokens)},
                                          sampled_token_ids=[sampled if r == "r0" else [] for r in
                                                             out.num_scheduled_tokens])
        if args.family == "bd3lm" and n:
            runner_output.blockdiff_commits = {"r0": n}
        scheduler.update_from_output(out, runner_output)
        check("update_from_output", final)
        steps += 1
    print("RESULT " + json.dumps({
        "vllm": vllm.__version__, "family": args.family, "steps": steps, "page": page,
        "num_tokens": request.num_tokens, "violations": violations[:5], "num_violations": len(violations),
        "cache_blocks_after_append": len(calls_after_append),
        "cached_pages": manager.num_cached_block.get("r0", 0),
    }))


def _checker(manager, page, violations):
    def check(where, final):
        hashed = manager.num_cached_block.get("r0", 0) * page
        if hashed > final:
            violations.append({"at": where, "hashed_tokens": hashed, "final_tokens": final})
    return check


def _stack():
    frame = sys._getframe(2)
    while frame is not None:
        yield frame
        frame = frame.f_back


if __name__ == "__main__":
    main()
