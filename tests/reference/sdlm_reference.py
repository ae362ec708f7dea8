"""Reference SDLM decoding (OpenGVLab ``sdlm_inference.py`` semantics, DESIGN.md §4) on a plain Qwen2 model.

With L committed tokens ``x_0 .. x_{L-1}`` (prompt + generated), each step is one forward over

    x_0 .. x_{L-1}                       causal, positions 0 .. L-1
    [x_{L-1}, MASK x (D-1)]              the window, positions L-1 .. L+D-2

where the window attends to ``x_0 .. x_{L-2}`` and to the whole window (bidirectionally) but not to the causal
copy of ``x_{L-1}``. Logits are AR-style: window position j predicts ``x_{L+j}``.

Per window position: the sampling distribution is ``softmax(filter(logits / temperature))`` with SDLM's
top-p then top-k filters (applied at any temperature; filtered tokens get dtype-min logits); the token is its
argmax at temperature 0, else a draw per position from the sequence's generator. SDLM draws with
``Categorical(probs).sample()``; here the draw is an exponential race, ``argmax(p / E)`` with ``E ~ Exp(1)``
sampled for the whole ``[D, V]`` window (an exact draw from ``p`` as well), so that an engine using the same
generator and the same race reproduces the tokens exactly.
Confidence: ``prob_conf`` = the chosen token's probability in that distribution; ``entropy_conf`` =
``1 - H / log(V)`` with ``H = -sum p * log(p + 1e-9)`` (SDLM's formula, V = the logits' width).

Accept n = length of the leading run with confidence > ``threshold`` (strict), clamped to [1, D]. The
accepted tokens are emitted in order until the first eos (not emitted, generation stops) or until exactly
``max_new_tokens`` tokens exist (SDLM itself may overshoot by up to D-1; we do not).

``self_speculative``: the first pass drafts D tokens ``y`` from the window of the prompt. Each later step
verifies the draft: ``y_0`` is always accepted; ``y_i`` is accepted while it equals the first window
prediction after committing ``y_0 .. y_{i-1}`` (SDLM's verify row i-1; here one forward per row, computed
lazily until the first rejection, instead of SDLM's packed D-row pass — same tokens). The window of the last
accepted row is the next draft. At temperature 0 this equals first-token-only decoding (``threshold > 1``).

``accept_lengths`` holds the policy's n of every step (self-speculative: of every verify pass), before the eos /
length cut — so its sum may exceed ``len(tokens)`` in the last step.

Two implementations of the window forward, which must agree token for token:

* ``impl="full"``: one forward over committed tokens + window per step (no KV cache): quadratic, the plainest
  statement of the mask;
* ``impl="cached"`` (like SDLM's ``use_cache=True`` loop): a ``DynamicCache`` holds the causal keys/values of
  ``x_0 .. x_{L-2}``; each step feeds only the tokens accepted since (causal) and the window, then crops the
  window's keys/values off again. Batch 1, as SDLM. This is the baseline of ``benchmarks/bench_sdlm.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache

MASK_ID = 151665
EOS_IDS = (151643, 151645)
ALGORITHMS = ("prob_conf", "entropy_conf", "self_speculative")
IMPLS = ("full", "cached")


def window_attention(num_committed: int, D: int, causal_window: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(allowed ``[L+D, L+D]`` bool, positions ``[L+D]``) for committed tokens + the window.

    ``causal_window``: SDLM's ``causal_attn=True`` (the window attends causally within itself)."""
    L = num_committed
    idx = torch.arange(L + D)
    q, k = idx[:, None], idx[None, :]
    causal_rows = (q < L) & (k <= q)
    in_window = (k >= L) & ((k <= q) if causal_window else True)
    window_rows = (q >= L) & ((k < L - 1) | in_window)  # skip the causal copy of x_{L-1}
    positions = torch.cat([torch.arange(L), torch.arange(L - 1, L + D - 1)])
    return causal_rows | window_rows, positions


@torch.no_grad()
def window_logits(model, committed: Sequence[int], *, D: int, mask_id: int = MASK_ID,
                  causal_window: bool = False) -> torch.Tensor:
    """``[D, V]`` float32 logits of the window after ``committed`` (row j predicts the token at L+j)."""
    L = len(committed)
    if L == 0:
        raise ValueError("SDLM decoding needs at least one committed token")
    device = model.device
    ids = torch.tensor([list(committed) + [committed[-1]] + [mask_id] * (D - 1)], device=device)
    allowed, positions = window_attention(L, D, causal_window)
    dtype = model.get_input_embeddings().weight.dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    out = model(
        input_ids=ids,
        attention_mask=mask[None, None].to(device),  # 4-D additive masks pass through transformers as-is
        position_ids=positions[None].to(device),
        use_cache=False,
        logits_to_keep=D,
    )
    return out.logits[0].float()


def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


class CachedWindows:
    """``window_logits`` on top of a KV cache of the causal prefix (SDLM's cached loop)."""

    def __init__(self, model, *, D: int, mask_id: int = MASK_ID, causal_window: bool = False):
        self.model, self.D, self.mask_id, self.causal_window = model, D, mask_id, causal_window
        self.cache = DynamicCache(config=model.config)
        self.cached: list[int] = []  # tokens whose causal KV is in the cache

    @torch.no_grad()
    def __call__(self, committed: Sequence[int]) -> torch.Tensor:
        L, D = len(committed), self.D
        common = 0
        while common < min(len(self.cached), L - 1) and self.cached[common] == committed[common]:
            common += 1
        if common < len(self.cached):  # another branch (self-speculative rows): drop the rest
            self.cache.crop(common)
            self.cached = self.cached[:common]
        new = list(committed[common : L - 1])
        ids = new + [committed[-1]] + [self.mask_id] * (D - 1)
        n = len(new)
        q = torch.arange(n + D)[:, None]
        k = torch.arange(common + n + D)[None, :] - common  # key index relative to the new tokens
        causal_rows = (q < n) & (k <= q)
        # The window sees everything fed: cache and new tokens hold x_0..x_{L-2} only, never x_{L-1}.
        window_rows = torch.broadcast_to(q >= n, causal_rows.shape)
        if self.causal_window:
            window_rows = window_rows & ((k < n) | (k <= q))
        positions = torch.cat([torch.arange(common, L - 1), torch.arange(L - 1, L - 1 + D)])
        device = self.model.device
        dtype = self.model.get_input_embeddings().weight.dtype
        out = self.model(
            input_ids=torch.tensor([ids], device=device),
            attention_mask=_additive(causal_rows | window_rows, dtype).to(device),
            position_ids=positions[None].to(device),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=D,
        )
        self.cache.crop(-D)  # the window's keys/values are scratch (transformers 5: crop(-n) drops n)
        self.cached = list(committed[: L - 1])
        assert self.cache.get_seq_length() == L - 1
        return out.logits[0].float()


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, sorted_idx = torch.sort(logits, descending=True)
    cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cum > top_p
    remove[..., 1:] = remove[..., :-1].clone()  # keep the first token that crosses top_p
    remove[..., 0] = False
    drop = torch.zeros_like(remove).scatter_(-1, sorted_idx, remove)
    return logits.masked_fill(drop, torch.finfo(logits.dtype).min)


def _top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def sample_window(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = -1,
    entropy_conf: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDLM's ``sample_tokens`` for ``[D, V]`` logits: returns (tokens ``[D]``, confidence ``[D]``)."""
    if temperature > 0:
        logits = logits / temperature
    if top_p < 1.0:
        logits = _top_p_filter(logits, top_p)
    if top_k > 0:
        logits = _top_k_filter(logits, top_k)
    probs = F.softmax(logits, dim=-1)
    if temperature > 0:
        race = torch.empty(probs.shape, dtype=probs.dtype).exponential_(generator=generator).to(probs.device)
        tokens = (probs / race).argmax(dim=-1)
        conf = probs.gather(-1, tokens[:, None]).squeeze(-1)
    else:
        conf, tokens = probs.max(dim=-1)
    if entropy_conf:
        entropy = -(probs * torch.log(probs + 1e-9)).sum(dim=-1)
        conf = 1.0 - entropy / torch.log(torch.tensor(float(probs.shape[-1])))  # float32 log(V), as SDLM
    return tokens, conf


def accept_length(confidence: torch.Tensor, threshold: float) -> int:
    """Leading run of ``confidence > threshold``, clamped to [1, D]."""
    above = (confidence > threshold).tolist()
    n = above.index(False) if False in above else len(above)
    return max(1, n)


def _emit(tokens: Sequence[int], out: list[int], committed: list[int], eos: set[int], limit: int) -> bool:
    """Append accepted tokens; True when generation must stop (eos seen or limit reached)."""
    for t in tokens:
        if t in eos:
            return True
        out.append(t)
        committed.append(t)
        if len(out) >= limit:
            return True
    return False


@torch.no_grad()
def generate_sdlm(
    model,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    D: int,
    threshold: float,
    alg: str = "prob_conf",
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = -1,
    mask_id: int = MASK_ID,
    eos_ids: Sequence[int] = EOS_IDS,
    seed: int | None = None,
    impl: str = "full",
    causal_window: bool = False,
    rules=None,
) -> tuple[list[int], list[int]]:
    """Decode one prompt with SDLM; returns (generated tokens without eos, accept length per step).

    ``threshold`` is unused by ``self_speculative`` (drafts are accepted by verification only).
    ``rules`` (``vocab_rules.RefVocabRules``): vocabulary rules for every window row (row j of the window
    after output ``o`` is output position ``len(o) + j``; rows after row 0 do not know the rows before
    them), and a confident run is cut before a token that would complete a bad word.
    """
    if alg not in ALGORITHMS:
        raise ValueError(f"unknown alg {alg!r}; valid: {ALGORITHMS}")
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; valid: {IMPLS}")
    if D < 1 or max_new_tokens <= 0 or not prompt_ids:
        raise ValueError("need D >= 1, max_new_tokens > 0 and a non-empty prompt")
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)

    if impl == "cached":
        logits_of = CachedWindows(model, D=D, mask_id=mask_id, causal_window=causal_window)
    else:
        def logits_of(committed):
            return window_logits(model, committed, D=D, mask_id=mask_id, causal_window=causal_window)

    def predict(committed: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits_of(committed)
        if rules is not None:
            output = list(committed[len(prompt_ids):])
            logits = rules.apply(logits, output, [len(output) + j for j in range(D)])
        return sample_window(
            logits,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            entropy_conf=alg == "entropy_conf",
            generator=generator,
        )

    committed, out, accept_lengths, eos = list(prompt_ids), [], [], set(eos_ids)
    if alg != "self_speculative":
        while True:
            tokens, conf = predict(committed)
            n = min(accept_length(conf, threshold), D)
            if rules is not None:
                output = list(committed[len(prompt_ids):])
                for j in range(1, n):
                    if rules.completes_bad_word(output + tokens[:j].tolist(), len(output) + j, int(tokens[j])):
                        n = j
                        break
            accept_lengths.append(n)
            if _emit(tokens[:n].tolist(), out, committed, eos, max_new_tokens):
                return out, accept_lengths

    draft = predict(committed)[0].tolist()
    while True:
        # Verify row i = the window after committing draft[:i+1]; its first prediction checks draft[i+1].
        rows = [predict(committed + draft[:1])[0].tolist()]
        while len(rows) < D and draft[len(rows)] == rows[-1][0]:
            rows.append(predict(committed + draft[: len(rows) + 1])[0].tolist())
        n = len(rows)
        accept_lengths.append(n)
        if _emit(draft[:n], out, committed, eos, max_new_tokens):
            return out, accept_lengths
        draft = rows[-1]
