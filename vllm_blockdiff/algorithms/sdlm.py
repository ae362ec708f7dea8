"""SDLM decoding rules (OpenGVLab ``sdlm_inference.py``): predict a window of D tokens, keep the
longest confident prefix.

A window row j holds the logits for the token j places after the last committed one. Per row the
distribution is ``softmax(filter(logits / temperature))`` (SDLM's top-p then top-k filters); the
token is its argmax at temperature 0, else a draw from it. Confidence: ``prob_conf`` = the chosen
token's probability, ``entropy_conf`` = ``1 - H / log(V)``. ``accept_length`` keeps the leading run
with confidence strictly above the threshold, clamped to [1, D]: the first token always commits.

``self_speculative`` commits by verification instead of confidence: a window's predictions are the
draft, and draft token i+1 is accepted while it equals the first prediction of the window that
follows draft tokens 0..i (``verified_length``). Every committed token is therefore the first
prediction of the window after its prefix: the output is first-token-only decoding, and the
algorithm's gain is speed, from verifying D drafts in one packed pass.
"""

from __future__ import annotations

import numpy as np
import torch

ALGORITHMS = ("prob_conf", "entropy_conf", "self_speculative")
DEFAULT_ALGORITHM = "prob_conf"
DEFAULT_THRESHOLD = 0.5  # the seed card's example (``SDLM_generate(..., threshold=0.5)``)

_SOFTMAX_ROWS = 256  # bounds the [rows, vocab] probability buffer (vocab ~152k: 155 MB in fp32)


class WindowRequest:
    """One request's share of a batched window step (see :func:`commit_windows`)."""

    __slots__ = ("num_rows", "threshold", "temperature", "top_p", "top_k", "entropy_conf", "generator")

    def __init__(self, num_rows, threshold=DEFAULT_THRESHOLD, temperature=0.0, top_p=1.0, top_k=0,
                 entropy_conf=False, generator=None):
        self.num_rows = num_rows  # window rows of this request in the logits, in order
        self.threshold = threshold
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k  # <= 0: no top-k filter
        self.entropy_conf = entropy_conf
        self.generator = generator

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 and self.top_p >= 1.0 and self.top_k <= 0


def filter_logits(logits: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """SDLM's top-p (keep the smallest prefix of sorted tokens whose mass exceeds ``top_p``, at least one),
    then top-k; removed tokens get the dtype's minimum logit."""
    lowest = torch.finfo(logits.dtype).min
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        cum = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(remove).scatter_(-1, sorted_idx, remove), lowest)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, lowest)
    return logits


def entropy_confidence(probs: torch.Tensor) -> torch.Tensor:
    """``1 - H / log(V)`` with SDLM's ``H = -sum p * log(p + 1e-9)`` (float32 ``log(V)``)."""
    entropy = -(probs * torch.log(probs + 1e-9)).sum(dim=-1)
    max_entropy = torch.log(torch.tensor(probs.shape[-1], dtype=torch.float32)).to(entropy.device)
    return 1.0 - entropy / max_entropy


def sample_window(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    entropy_conf: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and confidences ``[rows]`` for one request's window logits ``[rows, vocab]``.

    Sampling (temperature > 0) is an exponential race, ``argmax(p / E)`` with ``E ~ Exp(1)`` drawn
    from ``generator`` for every row and vocabulary entry: an exact draw from ``p`` that runs on the
    logits' device.
    """
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    logits = filter_logits(logits, top_p, top_k)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        race = torch.empty_like(probs).exponential_(generator=generator)
        tokens = (probs / race).argmax(dim=-1)
        confidence = probs.gather(-1, tokens[:, None]).squeeze(-1)
    else:
        confidence, tokens = probs.max(dim=-1)
    if entropy_conf:
        confidence = entropy_confidence(probs)
    return tokens, confidence


def _greedy_round(logits: torch.Tensor, entropy: list[bool], thresholds: list[float]) -> tuple[list, list]:
    """Argmax of some greedy rows and whether each is confident (confidence > its threshold, compared
    in float32 like SDLM), in row chunks (one fused softmax per chunk)."""
    tokens, confident = [], []
    for start in range(0, logits.shape[0], _SOFTMAX_ROWS):
        rows = slice(start, start + _SOFTMAX_ROWS)
        probs = torch.softmax(logits[rows].float(), dim=-1)
        top, arg = probs.max(dim=-1)
        if any(entropy[rows]):
            top = torch.where(torch.tensor(entropy[rows], device=top.device), entropy_confidence(probs), top)
        threshold = torch.tensor(thresholds[rows], dtype=torch.float32, device=top.device)
        tokens += arg.tolist()
        confident += (top > threshold).tolist()
    return tokens, confident


def commit_windows(logits: torch.Tensor, requests: list[WindowRequest], rounds: bool | None = None) -> list[list[int]]:
    """The committed tokens of every request's window; ``logits`` rows follow ``requests`` in order.

    Sampled or filtered requests run :func:`sample_window` on their whole window with their own
    generator (the random stream never depends on the batch). Greedy requests are decided together:

    - ``rounds`` (the default on CPU): in rounds over window positions; round j computes row j only for
      the requests whose rows ``0..j-1`` were all confident, since no later row can commit otherwise.
      That skips most of the vocabulary-wide softmax work, which dominates a CPU step.
    - otherwise (accelerators, where a step is bound by launches and syncs): every row at once, one
      device-to-host copy of tokens and confidence flags, the leading runs found on the host.

    Both give the same tokens.
    """
    starts, start = [], 0
    for request in requests:
        starts.append(start)
        start += request.num_rows
    committed: list[list[int]] = [[] for _ in requests]
    greedy = []
    for i, request in enumerate(requests):
        if not request.num_rows:
            continue
        if request.greedy:
            greedy.append(i)
            continue
        rows = logits[starts[i] : starts[i] + request.num_rows]
        tokens, confidence = sample_window(rows, temperature=request.temperature, top_p=request.top_p,
                                           top_k=request.top_k, entropy_conf=request.entropy_conf,
                                           generator=request.generator)
        n = accept_length(confidence.cpu(), request.threshold)
        committed[i] = tokens[:n].tolist()
    if not greedy:
        return committed
    if rounds if rounds is not None else logits.device.type == "cpu":
        _greedy_in_rounds(logits, requests, starts, greedy, committed)
    else:
        _greedy_in_one_pass(logits, requests, starts, greedy, committed)
    return committed


def _greedy_in_rounds(logits, requests, starts, greedy, committed) -> None:
    running, j = greedy, 0
    while running:
        rows = torch.tensor([starts[i] + j for i in running], device=logits.device)
        tokens, confident_rows = _greedy_round(
            logits.index_select(0, rows),
            [requests[i].entropy_conf for i in running],
            [requests[i].threshold for i in running],
        )
        still = []
        for i, token, confident in zip(running, tokens, confident_rows):
            if j == 0 or confident:  # the first token always commits; later ones extend the run
                committed[i].append(token)
            if confident and j + 1 < requests[i].num_rows:
                still.append(i)
        running, j = still, j + 1


def _greedy_in_one_pass(logits, requests, starts, greedy, committed) -> None:
    index = torch.cat([torch.arange(starts[i], starts[i] + requests[i].num_rows) for i in greedy])
    counts = [requests[i].num_rows for i in greedy]
    owner = np.repeat(np.arange(len(greedy)), counts)
    tokens, confident = _greedy_round(logits.index_select(0, index.to(logits.device)),
                                      [requests[greedy[k]].entropy_conf for k in owner],
                                      [requests[greedy[k]].threshold for k in owner])
    offset = 0
    for i, n in zip(greedy, counts):
        run = confident[offset : offset + n]
        accepted = max(1, run.index(False) if False in run else n)
        committed[i] = tokens[offset : offset + accepted]
        offset += n


def accept_length(confidence: torch.Tensor, threshold: float) -> int:
    """Leading run of ``confidence > threshold``, clamped to ``[1, len(confidence)]``."""
    above = (confidence > threshold).tolist()
    run = above.index(False) if False in above else len(above)
    return max(1, run)



def window_predictions(logits: torch.Tensor, request: WindowRequest) -> list[int]:
    """All of one window's predictions (a self-speculative draft or verify row)."""
    if request.greedy:
        return logits.argmax(dim=-1).tolist()
    tokens, _ = sample_window(logits, temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                              generator=request.generator)
    return tokens.tolist()


def verified_length(draft: list[int], first_predictions: list[int]) -> int:
    """Self-speculative acceptance: ``draft[0]`` always, then ``draft[i+1]`` while it equals
    ``first_predictions[i]``, the first prediction of the window after ``draft[:i+1]``."""
    n = 1
    while n < len(draft) and draft[n] == first_predictions[n - 1]:
        n += 1
    return n
