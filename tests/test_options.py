"""Request-option validation (pure; the engine-level rejection is in tests/engine)."""

import pytest
from vllm import SamplingParams

from vllm_blockdiff.options import (
    ModelDefaults,
    OptionError,
    resolve_bd3lm_options,
    resolve_sdlm_options,
    validate_request,
)

DEFAULTS = ModelDefaults(family="bd3lm", mask_token_id=151665, block_size=32, kv_page_size=128, max_model_len=1024)
SDLM_DEFAULTS = ModelDefaults(family="sdlm", mask_token_id=151665, block_size=4, kv_page_size=128, max_model_len=1024)


def test_card_defaults():
    opts = resolve_bd3lm_options(SamplingParams(max_tokens=128), DEFAULTS)
    assert (opts.steps, opts.block_size, opts.remasking, opts.cfg_scale) == (128, 32, "low_confidence", 0.0)
    assert opts.steps_per_block == 32


@pytest.mark.parametrize(
    "kwargs,param",
    [
        (dict(extra_args={"steps": 0}), "steps"),
        (dict(extra_args={"steps": 2.5}), "steps"),
        (dict(extra_args={"steps": True}), "steps"),
        (dict(extra_args={"block_size": 48}), "block_size"),
        (dict(extra_args={"block_size": 256}), "block_size"),
        (dict(extra_args={"remasking": "entropy"}), "remasking"),
        (dict(extra_args={"cfg_scale": -1}), "cfg_scale"),
        (dict(extra_args={"threshold": 1.5}), "threshold"),
        (dict(extra_args={"threshold": "high"}), "threshold"),
        (dict(extra_args={"factor": 0}), "factor"),
        (dict(extra_args={"factor": float("nan")}), "factor"),
        (dict(extra_args={"threshold": 0.9, "factor": 1.0}), "factor"),
        (dict(extra_args={"threshold": 0.9, "remasking": "random"}), "threshold"),
        (dict(top_p=0.9), "top_p"),
        (dict(top_k=5), "top_k"),
        (dict(presence_penalty=0.5), "presence_penalty"),
        (dict(logprobs=2), "logprobs"),
    ],
)
def test_bad_values_name_the_parameter(kwargs, param):
    with pytest.raises(OptionError) as err:
        resolve_bd3lm_options(SamplingParams(max_tokens=16, **kwargs), DEFAULTS)
    assert err.value.parameter == param
    assert param in str(err.value)


def test_parallel_decoding_options():
    opts = resolve_bd3lm_options(SamplingParams(max_tokens=16, extra_args={"threshold": 0.9}), DEFAULTS)
    assert (opts.threshold, opts.factor) == (0.9, None)
    opts = resolve_bd3lm_options(SamplingParams(max_tokens=16, extra_args={"factor": 2}), DEFAULTS)
    assert (opts.threshold, opts.factor) == (None, 2.0)
    assert resolve_bd3lm_options(SamplingParams(max_tokens=16), DEFAULTS).threshold is None


def test_guidance_needs_room_in_the_context():
    guided = dict(extra_args={"cfg_scale": 1.0})
    with pytest.raises(OptionError) as err:
        validate_request(SamplingParams(max_tokens=800, **guided), DEFAULTS, prompt_len=100)  # + 128 + 32 > 1024
    assert err.value.parameter == "max_tokens"
    validate_request(SamplingParams(max_tokens=700, **guided), DEFAULTS, prompt_len=100)
    validate_request(SamplingParams(max_tokens=1000), DEFAULTS, prompt_len=100)  # unguided: length-capped


def test_guidance_needs_the_served_block_size():
    with pytest.raises(OptionError) as err:
        resolve_bd3lm_options(SamplingParams(max_tokens=8, extra_args={"cfg_scale": 1.0, "block_size": 16}), DEFAULTS)
    assert err.value.parameter == "cfg_scale"
    assert resolve_bd3lm_options(SamplingParams(max_tokens=8, extra_args={"cfg_scale": 0.5}), DEFAULTS).cfg_scale == 0.5


def test_block_must_fit_one_step_with_its_clean_pass():
    small = ModelDefaults("bd3lm", 151665, 32, 128, 1024, max_step_tokens=100)
    resolve_bd3lm_options(SamplingParams(max_tokens=8, extra_args={"block_size": 32}), small)
    with pytest.raises(OptionError) as err:
        resolve_bd3lm_options(SamplingParams(max_tokens=8, extra_args={"block_size": 64}), small)
    assert err.value.parameter == "block_size"


def test_sdlm_defaults_follow_the_card_example():
    opts = resolve_sdlm_options(SamplingParams(max_tokens=16), SDLM_DEFAULTS)
    assert (opts.alg, opts.threshold, opts.window, opts.entropy_conf) == ("prob_conf", 0.5, 4, False)
    opts = resolve_sdlm_options(
        SamplingParams(max_tokens=16, temperature=0.7, top_p=0.9, top_k=20, seed=3,
                       extra_args={"alg": "entropy_conf", "threshold": 0.98}), SDLM_DEFAULTS)
    assert (opts.alg, opts.threshold, opts.top_p, opts.top_k, opts.seed, opts.entropy_conf) == (
        "entropy_conf", 0.98, 0.9, 20, 3, True)


@pytest.mark.parametrize(
    "kwargs,param",
    [
        (dict(extra_args={"alg": "low_confidence"}), "alg"),
        (dict(extra_args={"threshold": -1}), "threshold"),
        (dict(extra_args={"threshold": "0.5"}), "threshold"),
        (dict(extra_args={"threshold": float("inf")}), "threshold"),
        (dict(extra_args={"threshold": True}), "threshold"),
        (dict(extra_args={"steps": 4}), "steps"),
        (dict(extra_args={"remasking": "random"}), "remasking"),
        (dict(min_p=0.1), "min_p"),
        (dict(repetition_penalty=1.2), "repetition_penalty"),
        (dict(logprobs=1, extra_args={"alg": "self_speculative"}), "logprobs"),
        (dict(prompt_logprobs=1), "prompt_logprobs"),
    ],
)
def test_sdlm_bad_values_name_the_parameter(kwargs, param):
    with pytest.raises(OptionError) as err:
        validate_request(SamplingParams(max_tokens=16, **kwargs), SDLM_DEFAULTS)
    assert err.value.parameter == param
