"""Per-request sampling for the engine: the same arithmetic as `model.generate`'s `_pick`, applied to
rows with different parameters in one batch.

A sampled request's draws are a counter-based stream: its t-th new token takes the uniform number
`uniform(seed, t)` (a hash of the two) through the inverse of its row's cumulative distribution. So all the
rows of a step sample in one batched call, a request's tokens depend on its seed and its logits only, never
on what else shares the batch, and a request alone gives exactly what `model.generate(..., seed=s)` gives.
(Each request used to draw from its own `torch.Generator`: one `multinomial` call per row and step, ~26 us
of host time per sampled sequence and, on a GPU, one more kernel launch each.)
"""
from __future__ import annotations

import random
from typing import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field


class SamplingParams(BaseModel):
    """How one request is decoded. Greedy when temperature == 0."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    seed: int | None = Field(None, description="None: a fresh random seed per request")
    ignore_eos: bool = Field(False, description="keep generating past EOS (benchmarks)")
    # DeepSeek-OCR's guard against loops on tables: ban any token that would repeat an n-gram of
    # this size seen in the last `no_repeat_window` generated tokens (0 = all of them).
    no_repeat_ngram_size: int = Field(0, ge=0)
    no_repeat_window: int = Field(0, ge=0)
    no_repeat_whitelist: tuple[int, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def request_seed(params: SamplingParams) -> int | None:
    """The seed a request samples with: its own, a fresh random one when it has none, None when greedy."""
    if params.greedy:
        return None
    return params.seed if params.seed is not None else random.getrandbits(63)


_U64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finalizer: a bijection of 64-bit integers that scatters nearby inputs."""
    x = (x + 0x9E3779B97F4A7C15) & _U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
    return x ^ (x >> 31)


def uniform(seed: int, step: int) -> float:
    """The draw in [0, 1) of the request seeded `seed` for its `step`-th new token (53 random bits)."""
    return (_mix(_mix(seed & _U64) ^ step) >> 11) * 2.0**-53


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [S, V], u [S] in [0, 1) -> [S] ids: each row's first token whose cumulative probability
    exceeds u times the row's total (float64 sums; a token of probability 0 is never drawn)."""
    cum = probs.double().cumsum(-1)
    total = cum[:, -1:]
    x = torch.minimum(u.to(cum)[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cum, x, right=True)[:, 0]


def banned_by_ngram(generated: Sequence[int], params: SamplingParams) -> list[int]:
    """Tokens that would complete an n-gram already present in the window (host side, cheap:
    the window is at most a few hundred tokens)."""
    n = params.no_repeat_ngram_size
    if n <= 0 or len(generated) < n:
        return []
    window = generated[-params.no_repeat_window:] if params.no_repeat_window else generated
    prefix = tuple(generated[len(generated) - (n - 1):]) if n > 1 else ()
    banned = set()
    for i in range(len(window) - n + 1):
        if tuple(window[i : i + n - 1]) == prefix:
            banned.add(window[i + n - 1])
    return sorted(banned.difference(params.no_repeat_whitelist))


class NgramGuard:
    """`banned_by_ngram` for one request, kept up to date as its tokens grow: the window's n-grams indexed
    by their first n - 1 tokens, so a step costs one lookup instead of a scan of the window. The scan is
    ~22 us per sequence and step at DeepSeek-OCR's settings (n-gram 30, window 90): ~6 ms of host time per
    step at 256 sequences, while the GPU waits (bench/step_host_bench.py)."""

    def __init__(self, params: SamplingParams):
        self.n, self.window = params.no_repeat_ngram_size, params.no_repeat_window
        self.whitelist = frozenset(params.no_repeat_whitelist)
        self.index: dict[tuple[int, ...], dict[int, int]] = {}  # first n - 1 tokens -> {next token: count}
        self.seen = 0  # tokens indexed so far
        self.oldest = 0  # start of the oldest n-gram still indexed

    def banned(self, generated: Sequence[int]) -> list[int]:
        """What `banned_by_ngram(generated, params)` gives, for this request's growing `generated`."""
        n = self.n
        if n <= 0 or 0 < self.window < n:  # off, or no n-gram fits in the window
            return []
        for end in range(max(self.seen + 1, n), len(generated) + 1):  # n-grams generated[end - n : end]
            key, t = tuple(generated[end - n : end - 1]), generated[end - 1]
            nxt = self.index.get(key)
            if nxt is None:
                nxt = self.index[key] = {}
            nxt[t] = nxt.get(t, 0) + 1
        self.seen = len(generated)
        # the window keeps the n-grams starting at len - window or later
        first = max(0, len(generated) - self.window) if self.window else 0
        for start in range(self.oldest, min(first, len(generated) - n + 1)):
            key, t = tuple(generated[start : start + n - 1]), generated[start + n - 1]
            nxt = self.index[key]
            nxt[t] -= 1
            if not nxt[t]:
                del nxt[t]
                if not nxt:
                    del self.index[key]
        self.oldest = max(self.oldest, first)
        if len(generated) < n:
            return []
        nxt = self.index.get(tuple(generated[len(generated) - (n - 1):]) if n > 1 else ())
        return sorted(set(nxt).difference(self.whitelist)) if nxt else []


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    draws: Sequence[float | None],
    seen: torch.Tensor | None,
    banned: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """logits [S, V] float32 -> next ids [S] on the device. `draws[i]` is row i's `uniform(...)`, None
    where it is greedy.

    `seen` [S, V] bool marks the tokens each row has seen (prompt + generated), for the repetition
    penalty; rows whose penalty is 1.0 are untouched. HF's order, as `_pick`: penalty, then
    temperature, then top-p, then sample (or argmax)."""
    dev = logits.device
    logits = logits.float()
    if banned is not None and any(banned):
        rows = [i for i, b in enumerate(banned) for _ in b]
        cols = [t for b in banned for t in b]
        logits = logits.index_put((torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)),
                                  torch.tensor(float("-inf"), device=dev))
    penalty = [p.repetition_penalty for p in params]
    if seen is not None and any(p != 1.0 for p in penalty):
        pen = torch.tensor(penalty, device=dev)[:, None]
        hit = seen & (pen != 1.0)
        logits = torch.where(hit, torch.where(logits < 0, logits * pen, logits / pen), logits)
    out = logits.argmax(-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled:
        return out
    idx = torch.tensor(sampled, device=dev)
    sub = logits[idx] / torch.tensor([params[i].temperature for i in sampled], device=dev)[:, None]
    if any(params[i].top_p < 1.0 for i in sampled):
        # thresholds computed on the host in double, as `_pick`'s python scalar `1 - top_p` is
        thr = torch.tensor([1 - params[i].top_p if params[i].top_p < 1.0 else -1.0 for i in sampled], device=dev)
        sorted_logits, order = sub.sort(descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= thr[:, None]
        drop[:, -1] = False
        sub = sub.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    probs = sub.softmax(-1)
    u = torch.tensor([draws[i] for i in sampled], dtype=torch.float64, device=dev)
    return out.index_copy(0, idx, draw(probs, u))
