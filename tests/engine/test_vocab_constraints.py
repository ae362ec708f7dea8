"""``logit_bias``, ``allowed_token_ids``, ``bad_words`` and ``min_tokens`` through the real engine, both
families, token-exact against the reference decoders with the reference vocabulary rules
(``tests/reference/vocab_rules.py``)."""

from __future__ import annotations

import random

import pytest
from vllm import SamplingParams

from tests.conftest import EOS_ID, MASK_ID, PAD_ID, STOP_IDS, inproc_engine, random_prompt, truncate_at_stop
from tests.reference import load_reference_model
from tests.reference.bd3lm_reference import generate_bd3lm
from tests.reference.sdlm_reference import generate_sdlm
from tests.reference.vocab_rules import RefVocabRules


def _bad_bigram(tokens: list[int]) -> list[int]:
    """A two-token sequence the unconstrained output contains (so banning it must change something)."""
    for a, b in zip(tokens, tokens[1:]):
        if a != b and a not in STOP_IDS and b not in STOP_IDS:
            return [a, b]
    raise AssertionError(f"no bigram in {tokens}")


def _contains(tokens: list[int], word: list[int]) -> bool:
    return any(tokens[i : i + len(word)] == word for i in range(len(tokens) - len(word) + 1))


def _text_of(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids)


class TestBD3LM:
    @pytest.fixture(scope="class")
    def llm(self, bd3lm_ckpt):
        yield from inproc_engine(bd3lm_ckpt)

    @pytest.fixture(scope="class")
    def model(self, bd3lm_ckpt, reference_threads):
        return load_reference_model(bd3lm_ckpt)

    def run(self, llm, prompt, **kw):
        extra = kw.pop("extra", {"steps": 16, "block_size": 16})
        params = SamplingParams(max_tokens=32, temperature=kw.pop("temperature", 0.0), extra_args=extra, **kw)
        [out] = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        return list(out.outputs[0].token_ids)

    def reference(self, model, prompt, rules, extra=None, **kw):
        extra = extra or {"steps": 16, "block_size": 16}
        return truncate_at_stop(generate_bd3lm(model, prompt, max_new_tokens=32, eos_ids=(EOS_ID,), rules=rules,
                                               **extra, **kw))

    def test_logit_bias_and_allowed_token_ids(self, llm, model):
        prompt = random_prompt(random.Random("bias"), 21)
        plain = self.run(llm, prompt)
        bias = {plain[0]: -30.0, plain[3]: -5.0, 1234: 4.0}
        got = self.run(llm, prompt, logit_bias=bias)
        assert got == self.reference(model, prompt, RefVocabRules(logit_bias=bias)) != plain
        allowed = sorted({plain[1], plain[5], 777, 4242, EOS_ID})
        got = self.run(llm, prompt, allowed_token_ids=allowed)
        # The card's eos stop can leave masks in the last chunk (docs/design.md §6): never text.
        assert set(got) - {MASK_ID} <= set(allowed)
        assert got == self.reference(model, prompt, RefVocabRules(allowed_token_ids=allowed))

    def test_bad_words_never_appear(self, llm, model, bd3lm_ckpt):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(bd3lm_ckpt)
        rng = random.Random("bad")
        for trial in range(3):
            prompt = random_prompt(rng, rng.randint(5, 40))
            extra = {"steps": 8, "block_size": 16} if trial else {"steps": 16, "block_size": 16, "threshold": 0.004}
            plain = self.run(llm, prompt, extra=extra)
            single, pair = plain[2], _bad_bigram(plain[4:])
            words = [_text_of(tokenizer, [single]), _text_of(tokenizer, pair)]
            params = SamplingParams(max_tokens=32, temperature=0.0, bad_words=words, extra_args=extra)
            [out] = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
            got = list(out.outputs[0].token_ids)
            # vLLM tokenizes the words itself (with and without a leading space): the reference uses its ids.
            ids = _engine_bad_word_ids(llm, words)
            assert [single] in ids or any(len(w) > 1 for w in ids)
            assert not any(_contains(got, w) for w in ids), (got, ids)
            assert got == self.reference(model, prompt, RefVocabRules(bad_words=ids), extra=extra)


def _engine_bad_word_ids(llm, words: list[str]) -> list[list[int]]:
    """The token sequences vLLM makes of ``bad_words`` (SamplingParams.update_from_tokenizer)."""
    params = SamplingParams(bad_words=words)
    params.update_from_tokenizer(llm.get_tokenizer())
    return params.bad_words_token_ids


class TestBD3LMEos:
    """min_tokens where it matters: a checkpoint that often emits eos."""

    @pytest.fixture(scope="class")
    def llm(self, bd3lm_eos_ckpt):
        yield from inproc_engine(bd3lm_eos_ckpt)

    @pytest.fixture(scope="class")
    def model(self, bd3lm_eos_ckpt, reference_threads):
        return load_reference_model(bd3lm_eos_ckpt)

    def test_min_tokens(self, llm, model):
        rng = random.Random("min")
        prompts = [random_prompt(rng, rng.randint(3, 60)) for _ in range(16)]
        plain = llm.generate([{"prompt_token_ids": p} for p in prompts],
                             SamplingParams(max_tokens=64, temperature=0.0, extra_args={"steps": 32}), use_tqdm=False)
        assert any(len(o.outputs[0].token_ids) < 40 for o in plain)  # eos early without min_tokens
        params = SamplingParams(max_tokens=64, temperature=0.0, min_tokens=40, extra_args={"steps": 32})
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        rules = RefVocabRules(stop_ids=(PAD_ID, EOS_ID), min_tokens=40)
        for prompt, out in zip(prompts, outs):
            got = list(out.outputs[0].token_ids)
            assert len(got) >= 40 and not set(got[:40]) & set(STOP_IDS)
            expected = generate_bd3lm(model, prompt, max_new_tokens=64, steps=32, eos_ids=(EOS_ID,), rules=rules)
            assert got == truncate_at_stop(expected)


class TestSDLM:
    D = 4

    @pytest.fixture(scope="class")
    def llm(self, sdlm4_ckpt):
        yield from inproc_engine(sdlm4_ckpt)

    @pytest.fixture(scope="class")
    def model(self, sdlm4_ckpt, reference_threads):
        return load_reference_model(sdlm4_ckpt)

    def run(self, llm, prompts, xargs, **kw):
        params = SamplingParams(max_tokens=32, temperature=kw.pop("temperature", 0.0), extra_args=xargs, **kw)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def reference(self, model, prompt, xargs, rules, **kw):
        tokens, _ = generate_sdlm(model, prompt, max_new_tokens=32, D=self.D, threshold=xargs.get("threshold", 0.5),
                                  alg=xargs.get("alg", "prob_conf"), rules=rules, impl="cached", **kw)
        return tokens

    @staticmethod
    def without_stop(tokens):
        return [t for t in tokens if t not in STOP_IDS]

    @pytest.mark.parametrize("xargs", [{"threshold": 0.3}, {"alg": "entropy_conf", "threshold": 0.9},
                                       {"alg": "self_speculative"}])
    def test_every_constraint_matches_the_reference(self, llm, model, xargs):
        rng = random.Random(f"sdlm-{xargs}")
        prompts = [random_prompt(rng, rng.randint(2, 30)) for _ in range(3)]
        plain = self.run(llm, prompts, xargs, ignore_eos=True)  # tokens the model likes, to constrain
        for prompt, base in zip(prompts, plain):
            base = self.without_stop(base)
            cases = [
                (dict(logit_bias={base[0]: -40.0, base[2]: 3.0}),
                 RefVocabRules(logit_bias={base[0]: -40.0, base[2]: 3.0})),
                (dict(allowed_token_ids=sorted(set(base[:6]) | {PAD_ID})),
                 RefVocabRules(allowed_token_ids=sorted(set(base[:6]) | {PAD_ID}))),
                (dict(min_tokens=12), RefVocabRules(stop_ids=STOP_IDS, min_tokens=12)),
            ]
            pair = _bad_bigram(base)
            words = [llm.get_tokenizer().decode(pair)]
            cases.append((dict(bad_words=words), RefVocabRules(bad_words=_engine_bad_word_ids(llm, words))))
            for kw, rules in cases:
                [got] = self.run(llm, [prompt], xargs, **kw)
                assert self.without_stop(got) == self.reference(model, prompt, xargs, rules), kw
                if "bad_words" in kw:
                    assert not any(_contains(got, w) for w in rules.bad_words)

    def test_constrained_and_plain_requests_share_batches(self, llm, model):
        rng = random.Random("mixed")
        prompts = [random_prompt(rng, rng.randint(2, 30)) for _ in range(8)]
        kws = [{}, {"logit_bias": {100: 5.0}}, {"min_tokens": 20}, {"allowed_token_ids": list(range(1000, 1100))}] * 2
        xargs = {"threshold": 0.4}
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            [SamplingParams(max_tokens=32, temperature=0.0, extra_args=xargs, **kw) for kw in kws],
                            use_tqdm=False)
        rules = [None, RefVocabRules(logit_bias={100: 5.0}), RefVocabRules(stop_ids=STOP_IDS, min_tokens=20),
                 RefVocabRules(allowed_token_ids=list(range(1000, 1100)))] * 2
        for prompt, out, rule in zip(prompts, outs, rules):
            got = self.without_stop(list(out.outputs[0].token_ids))
            assert got == self.reference(model, prompt, xargs, rule)
