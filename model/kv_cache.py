"""The engine's KV cache: fixed-size blocks preallocated once, handed to sequences by block tables.

Per layer it holds one tensor per cache entry, indexed by slot (block * block_size + offset): for MHA
(tiny) the key and the value [kv_heads, head_dim] (stored head-major); for MLA (small, base) the normalised latent
[kv_lora_rank] and the shared roped key [qk_rope_head_dim], i.e. kv_lora_rank + qk_rope_head_dim
values per token. A sequence reserves every block it can ever need (prompt + max_new_tokens)
when it is admitted, so a running sequence never waits for memory and nothing is ever preempted;
a request that does not fit waits in the queue until finished sequences free their blocks.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch


class BlockAllocator:
    """Free blocks as a mask. A reservation takes one contiguous run of blocks when there is one (first
    fit), so a sequence's cache is usually one slice of the pool that attention can read in place."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = np.ones(num_blocks, dtype=bool)
        self._count = num_blocks

    @property
    def free(self) -> int:
        return self._count

    def allocate(self, n: int) -> list[int]:
        if n > self._count:
            raise MemoryError(f"{n} cache blocks wanted, {self._count} free")
        # runs of free blocks: starts where free begins, ends where it stops
        edges = np.diff(np.concatenate(([0], self._free.view(np.int8), [0])))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        fit = np.flatnonzero(ends - starts >= n)
        if fit.size:
            blocks = np.arange(starts[fit[0]], starts[fit[0]] + n)
        else:  # fragmented: any free blocks (attention then gathers them)
            blocks = np.flatnonzero(self._free)[:n]
        self._free[blocks] = False
        self._count -= n
        return blocks.tolist()

    def take_last(self) -> int:
        """Withhold the pool's last block for the engine's own use (first fit keeps the others' layout)."""
        if not self._free[-1]:
            raise MemoryError("the last cache block is taken")
        self._free[-1] = False
        self._count -= 1
        return self.num_blocks - 1

    def release(self, blocks: list[int]) -> None:
        self._free[blocks] = True
        self._count += len(blocks)


def contiguous(blocks: list[int]) -> bool:
    return bool(blocks) and blocks[-1] - blocks[0] == len(blocks) - 1


class PagedKVCache:
    """Per layer one tensor per cache entry, slot-indexed (slot = block * block_size + offset). An entry
    with heads, [kv_heads, D], is stored head-major, [kv_heads, slots, D]: a sequence's keys of one head
    are then one contiguous run, which attention in place reads at memory speed (token-major, each head's
    rows are strided by the other heads'); an entry without, [rank], is stored [slots, rank]."""

    def __init__(self, entry_shapes: list[tuple[tuple[int, ...], ...]], num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype):
        self.block_size = block_size
        self.num_blocks = num_blocks
        slots = num_blocks * block_size
        self.layers = [
            tuple(torch.zeros(*shape[:-1], slots, shape[-1], device=device, dtype=dtype) for shape in shapes)
            for shapes in entry_shapes
        ]

    @staticmethod
    def _token_major(c: torch.Tensor) -> torch.Tensor:
        """The storage as a (strided) view [slots, *entry]."""
        return c.movedim(c.dim() - 2, 0)

    def write(self, layer: int, slots: torch.Tensor, entries: tuple[torch.Tensor, ...]) -> None:
        """entries[j] [N, *entry] into flat slots [N]."""
        for cache, e in zip(self.layers[layer], entries):
            cache.index_copy_(cache.dim() - 2, slots, e.movedim(0, e.dim() - 2).to(cache.dtype))

    def view(self, layer: int, start: int, length: int) -> tuple[torch.Tensor, ...]:
        """Slots [start, start + length) of a contiguous reservation, in place: per entry [1, length, *entry]."""
        return self.strided(layer, start, 0, 1, length)

    def run_fits(self, start: int, stride: int, count: int, length: int) -> bool:
        """Whether `strided(..., start, stride, count, length)` lies inside the pool."""
        return start + (count - 1) * stride + length <= self.num_blocks * self.block_size

    def strided(self, layer: int, start: int, stride: int, count: int, length: int) -> tuple[torch.Tensor, ...]:
        """`count` reservations starting every `stride` slots from `start`, `length` slots each, in place:
        per entry [count, length, *entry] (one view; rows may overlap, which reading allows)."""
        if not self.run_fits(start, stride, count, length):
            raise IndexError(f"slots {start}..+{(count - 1) * stride + length} past the pool's "
                             f"{self.num_blocks * self.block_size}")
        out = []
        for c in self.layers[layer]:
            tm = self._token_major(c)
            s0, *rest = tm.stride()
            out.append(tm.as_strided((count, length, *tm.shape[1:]), (stride * s0, s0, *rest),
                                     tm.storage_offset() + start * s0))
        return tuple(out)

    def gather(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """blocks [G, nb] -> per entry [G, nb * block_size, *entry] (the sequences' tokens in order)."""
        offsets = torch.arange(self.block_size, device=blocks.device)
        slots = (blocks[..., None] * self.block_size + offsets).flatten(1)
        return tuple(self._token_major(c)[slots] for c in self.layers[layer])


def bytes_per_token(entry_shapes: list[tuple[tuple[int, ...], ...]], dtype: torch.dtype) -> int:
    size = torch.empty(0, dtype=dtype).element_size()
    return sum(math.prod(s) for shapes in entry_shapes for s in shapes) * size


@dataclass(frozen=True)
class CachePlan:
    num_blocks: int
    block_size: int
    max_seqs: int
    max_step_tokens: int
    budget_bytes: int
    bytes_per_token: int

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size


def _host_available_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 * 2**30


def plan_cache(
    entry_shapes: list[tuple[tuple[int, ...], ...]],
    dtype: torch.dtype,
    device: torch.device,
    *,
    kv_cache_tokens: int | None = None,
    memory_budget_bytes: int | None = None,
    memory_fraction: float = 0.85,
    activation_reserve_bytes: int | None = None,
    block_size: int | None = None,
    max_seqs: int | None = None,
    max_step_tokens: int | None = None,
) -> CachePlan:
    """Choose the cache size and batch limits.

    CUDA: `memory_fraction` of the free memory after the weights are loaded, less a reserve for
    activations of a full step (vision chunk, prefill chunk, logits). CPU: a quarter of the
    available RAM up to 1 GiB (a CPU engine is for tests and small jobs; the cache is zeroed, so it is resident). `kv_cache_tokens` or
    `memory_budget_bytes` override the plan."""
    per_token = bytes_per_token(entry_shapes, dtype)
    cuda = device.type == "cuda"
    block_size = block_size or (64 if cuda else 16)
    max_step_tokens = max_step_tokens or (8192 if cuda else 2048)
    if kv_cache_tokens is not None:
        budget = kv_cache_tokens * per_token
    elif memory_budget_bytes is not None:
        budget = memory_budget_bytes
    elif cuda:
        free, _ = torch.cuda.mem_get_info(device)
        reserve = activation_reserve_bytes if activation_reserve_bytes is not None else max(2 * 2**30, free // 10)
        budget = max(int(free * memory_fraction) - reserve, 0)
    else:
        budget = min(_host_available_bytes() // 8, 2**30)
    num_blocks = budget // (per_token * block_size)
    if num_blocks < 1:
        raise MemoryError(f"no room for a KV cache: budget {budget} bytes, {per_token * block_size} bytes per block")
    default_seqs = 256 if cuda else 64
    seqs = max_seqs or default_seqs
    return CachePlan(num_blocks=int(num_blocks), block_size=block_size, max_seqs=seqs,
                     max_step_tokens=max(max_step_tokens, seqs), budget_bytes=int(budget), bytes_per_token=per_token)
