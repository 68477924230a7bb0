"""One engine step through the decoder: many sequences' tokens packed into one [N, hidden] row.

Every linear layer and the MoE see the packed tokens (no padding). Attention runs per piece:
a prefill chunk attends causally to its own sequence (`is_causal` on the fresh keys when it is
the sequence's first chunk; after a cached prefix, a lower-right causal mask, or on CPU two mask-free
flash calls, prefix and chunk, joined by their log-sum-exps), and
the decode tokens attend in groups of similar cached length, each group padded only to its own
longest member, so no sequence is padded to the batch's longest. A group reads its sequences'
caches in place when they are evenly spaced contiguous runs (`InPlace`, one strided view), else
it gathers their blocks (`DecodeGroup`), or, with the paged kernel (CUDA), one `DecodeGroup` reads
every sequence's blocks in place to its own length.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .kv_cache import PagedKVCache


@dataclass
class Prefill:
    row: int  # first packed row of the chunk
    n: int  # tokens in the chunk
    start: int  # cache position of the chunk's first token
    blocks: torch.Tensor | None = None  # [1, nb] the sequence's blocks, when start > 0 (None: `view_start`)
    view_start: int | None = None  # first slot, when the sequence's cache is contiguous
    mask: torch.Tensor | None = None  # [1, 1, n, start + n] lower-right causal, when start > 0, made by
    # `forward_step` (additive 0/-inf) unless attention runs the chunk in two parts without one


@dataclass
class InPlace:
    """Decode tokens whose sequences' caches are contiguous runs starting every `stride` slots from
    `start` (equal reservations side by side): attention reads them in place, as one strided view."""

    rows: torch.Tensor | slice  # [G] packed rows of the tokens, in slot order (a slice: consecutive rows)
    start: int  # first slot of the first sequence's reservation
    stride: int  # slots from one sequence's reservation to the next's
    length: int  # the longest sequence's cached tokens, this step's included
    mask: torch.Tensor | None = None  # [G, 1, 1, length] True at each sequence's real positions; None: all


@dataclass
class DecodeGroup:
    rows: torch.Tensor  # [G] packed rows of the group's tokens
    blocks: torch.Tensor  # [G, nb] block tables, padded with block 0
    mask: torch.Tensor | None  # [G, 1, 1, nb * block_size] True at each sequence's real positions
    # [G] each sequence's cached tokens, this step's included: when given, attention reads the blocks in
    # place with the paged kernel (model/paged_attention.py), to each one's length, and `mask` is None
    lengths: torch.Tensor | None = None


@dataclass
class StepBatch:
    embeds: torch.Tensor  # [N, hidden]
    positions: torch.Tensor  # [N]
    slots: torch.Tensor  # [N] flat cache slot of each token
    prefills: list[Prefill] = field(default_factory=list)
    decodes: list[DecodeGroup] = field(default_factory=list)
    in_place: list[InPlace] = field(default_factory=list)
    logit_rows: torch.Tensor | slice | None = None  # [S] rows whose next-token logits are wanted


def decode_groups(lengths: list[int], max_waste: float = 0.25) -> list[list[int]]:
    """Indices of `lengths` grouped so that each group's padded length wastes at most
    `max_waste` of its real tokens (sorted by length; a new group starts when the next one
    would exceed that)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    total = 0  # real tokens of the last group
    for i in order:
        if groups:
            g = groups[-1]
            if lengths[i] * (len(g) + 1) <= (1 + max_waste) * (total + lengths[i]):
                g.append(i)
                total += lengths[i]
                continue
        groups.append([i])
        total = lengths[i]
    return groups


def strided_runs(starts: list[int], lengths: list[int], max_waste: float = 0.25,
                 limit: int | None = None) -> list[list[int]]:
    """Indices grouped into runs that one strided view can read: sorted by start, each run's starts
    evenly spaced (one stride), its padded length wasting at most `max_waste` of its real tokens, and
    its last row (last start + the run's longest length) within `limit` slots (the pool's end)."""
    order = sorted(range(len(starts)), key=starts.__getitem__)
    runs: list[list[int]] = []
    longest = total = 0  # of the last run (kept as it grows: a step's decode tokens pass here every step)
    for i in order:
        if runs:
            r = runs[-1]
            stride_ok = len(r) == 1 or starts[i] - starts[r[-1]] == starts[r[1]] - starts[r[0]]
            top = max(longest, lengths[i])
            fits = limit is None or starts[i] + top <= limit
            if stride_ok and fits and top * (len(r) + 1) <= (1 + max_waste) * (total + lengths[i]):
                r.append(i)
                longest, total = top, total + lengths[i]
                continue
        runs.append([i])
        longest = total = lengths[i]
    return runs


def _attention(attn, x: torch.Tensor, positions: torch.Tensor, step: StepBatch, cache: PagedKVCache,
               layer: int, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x [1, N, hidden] -> attention output [1, N, hidden] (one o_proj over all pieces)."""
    if hasattr(attn, "project_packed"):
        q, tok = attn.project_packed(x[0], rope)  # q [1, H, N, d]; per-token rows [N, ...]
    else:
        q, entries = attn.project(x, positions, rope)
        tok = attn.token_entries(entries)
    cache.write(layer, step.slots, tok)
    out = x.new_empty(x.shape[1], attn.o_proj.in_features)
    for p in step.prefills:
        qs = q[:, :, p.row : p.row + p.n]
        if p.start == 0:
            k, v = attn.kv_from_tokens(tuple(e[p.row : p.row + p.n][None] for e in tok))
            y = attn.core(qs, k, v, is_causal=True)
        else:
            if p.view_start is not None:
                cached = cache.view(layer, p.view_start, p.start + p.n)
            else:
                cached = tuple(e[:, : p.start + p.n] for e in cache.gather(layer, p.blocks))
            k, v = attn.kv_from_tokens(cached)
            y = attn.core(qs, k, v, mask=p.mask) if p.mask is not None else attn.core_continued(qs, k, v)
        out[p.row : p.row + p.n] = y[0]
    for d in step.in_place:
        k, v = attn.kv_from_tokens(cache.strided(layer, d.start, d.stride, _count(d.rows), d.length))
        qs = q[0][:, d.rows].transpose(0, 1)[:, :, None]  # [G, H, 1, d]
        out[d.rows] = attn.core(qs, k, v, mask=d.mask)[:, 0]
    for g in step.decodes:
        qs = q[0][:, g.rows].transpose(0, 1)  # [G, H, d]
        if g.lengths is not None:
            out[g.rows] = attn.core_paged(qs, cache.layers[layer], g.blocks, g.lengths, cache.block_size)
            continue
        k, v = attn.kv_from_tokens(cache.gather(layer, g.blocks))
        out[g.rows] = attn.core(qs[:, :, None], k, v, mask=g.mask)[:, 0]
    return attn.o_proj(out)[None]


def _count(rows: torch.Tensor | slice) -> int:
    return rows.stop - rows.start if isinstance(rows, slice) else len(rows)


def length_mask(lengths: list[int], n: int, device: torch.device) -> torch.Tensor:
    """[G, 1, 1, n] True at each sequence's real positions (the first `lengths[g]`)."""
    lens = torch.tensor(lengths, device=device)
    return (torch.arange(n, device=device)[None] < lens[:, None])[:, None, None]


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask as SDPA's additive one (0 / -inf), made once per step: given a boolean mask, SDPA
    on CPU converts it on every call, i.e. once per layer."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def continuation_mask(start: int, n: int, device: torch.device) -> torch.Tensor:
    """[1, 1, n, start + n] lower-right causal: a chunk's tokens see the cached prefix and their own past."""
    qpos = torch.arange(start, start + n, device=device)[:, None]
    return (torch.arange(start + n, device=device)[None] <= qpos)[None, None]


def forward_step(language, step: StepBatch, cache: PagedKVCache) -> torch.Tensor:
    """The decoder over a packed step -> float32 logits [S, vocab] at `step.logit_rows`."""
    attn0 = language.model.layers[0].self_attn
    in_two = hasattr(attn0, "core_continued") and attn0.continued_in_two(step.embeds.device, step.embeds.dtype)
    for p in step.prefills:  # chunks after a cached prefix: a mask unless attention runs them in two parts
        if p.start and p.mask is None and not in_two:
            p.mask = continuation_mask(p.start, p.n, step.embeds.device)
    for piece in [*step.prefills, *step.in_place, *step.decodes]:
        piece.mask = _additive(piece.mask, step.embeds.dtype)
    x = step.embeds[None]
    pos = step.positions[None]
    # every layer's rotary tables are the same (one config): made once per step, not once per layer
    rope = attn0.rotary(pos, x.dtype)
    for i, layer in enumerate(language.model.layers):
        x = x + _attention(layer.self_attn, layer.input_layernorm(x), pos, step, cache, i, rope)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    x = x[0, step.logit_rows]
    if x.shape[0] == 0:
        return x.new_empty(0, language.lm_head.weight.shape[0], dtype=torch.float32)
    return language.lm_head(language.model.norm(x)).float()
