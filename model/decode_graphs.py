"""Decode steps at fixed shapes, so that CUDA can replay each as a graph.

A decode-only step (every running sequence past its prompt) does the same work every time; only its sizes
change. On a GPU at small and middle batches such a step is bound by kernel launches (per layer ~25
kernels, and Python around each), which a CUDA graph replays without either. So these steps run at
bucketed sizes from static input buffers: the batch `B` is the next bucket up from the sequences decoding,
the block-table width `W` the longest sequence's blocks rounded up to `width_granule` tokens. Padding rows
feed token 0 at position 0, write to a scratch block no sequence owns and attend to that one slot;
table entries past a sequence's length are masked out by it. Attention gathers each
sequence's blocks (in a graph the block tables are data, not Python lists), or, where every sequence's
cache is a contiguous reservation and they are evenly spaced (equal reservations side by side, what the
engine's first fit gives requests admitted together), reads the pool in place through one strided view
fixed at capture (so a graph is kept per layout too, the newest `max_graphs`); the rest is `forward_step`.

On CUDA each (B, W) is captured the first time it is needed, into one memory pool shared by all of them
(they are replayed one at a time), and checked against the same step run eagerly twice: at capture, and
at its first replay on the next step's inputs (which catches a graph that kept a stale input). A capture
that fails or disagrees turns graphs off for this engine (logged, `stats["cuda_graph_fallbacks"]`) and
the step runs eagerly, as every step does on CPU, where the fixed shapes only serve the tests.
"""
from __future__ import annotations

import collections
import logging
import math
import time
from typing import Sequence

import numpy as np
import torch

from .kv_cache import PagedKVCache
from .runner import DecodeGroup, InPlace, StepBatch, forward_step

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


class StaticDecode:
    def __init__(self, language, cache: PagedKVCache, scratch_block: int, max_batch: int, max_tokens: int,
                 *, graphs: bool, width_granule: int = 512, max_graphs: int = 64,
                 stats: collections.Counter | None = None, paged: bool = False):
        dev = language.lm_head.weight.device
        if graphs and dev.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {dev}")
        self.language, self.cache, self.device = language, cache, dev
        self.paged = paged  # gathered rows attend through the paged kernel (reads the tables in place)
        bs = cache.block_size
        self.granule = max(1, math.ceil(width_granule / bs))  # in blocks
        self.max_blocks = -(-math.ceil(max_tokens / bs) // self.granule) * self.granule
        self.buckets = sorted({b for b in BATCH_BUCKETS if b < max_batch} | {max_batch})
        self.scratch = scratch_block
        top = self.buckets[-1]
        # every input in one device buffer, filled from one (pinned) host buffer of the same layout with one
        # copy per step: tokens, positions, slots, lengths [top] each, then the block tables [top, max_blocks]
        size = 4 * top + top * self.max_blocks
        self.inputs = torch.zeros(size, dtype=torch.long, device=dev)
        self.staging = torch.zeros(size, dtype=torch.long, pin_memory=dev.type == "cuda")
        self.host = self.staging.numpy()
        self.tokens, self.positions, self.slots, self.lengths = self.inputs[: 4 * top].view(4, top)
        self.tables = self.inputs[4 * top :].view(top, self.max_blocks)
        self.rows = torch.arange(top, device=dev)
        self.logits = torch.empty(top, language.lm_head.weight.shape[0], dtype=torch.float32, device=dev)
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}  # by (B, W, in-place run or None), oldest first
        self.checked: set[tuple] = set()  # graphs whose first replay on new inputs agreed with eager
        self.max_graphs = max_graphs
        self.use_graphs = graphs
        self.pool = None
        self.fallback: str | None = None  # why graphs were turned off
        self.stats = stats if stats is not None else collections.Counter()

    def shape(self, n: int, blocks: int) -> tuple[int, int] | None:
        """(B, W) for `n` sequences whose longest needs `blocks` blocks; None when beyond the buckets."""
        b = next((b for b in self.buckets if b >= n), None)
        w = -(-blocks // self.granule) * self.granule
        return (b, w) if b is not None and w <= self.max_blocks else None

    def run(self, shape: tuple[int, int], tokens: Sequence[int], positions: Sequence[int], slots: Sequence[int],
            tables: np.ndarray, lengths: Sequence[int], run: tuple[int, int] | None = None) -> torch.Tensor:
        """One decode step at `shape` (`self.shape`'s) -> float32 logits [n, vocab] (a view of a buffer the
        next step overwrites). `tables` [n, <= W]: each row's blocks (entries past a row's length are read
        masked out; the columns it lacks up to W point at the scratch block). `run`: (first slot, stride)
        when row i's cache is the contiguous reservation at first + i * stride: attention then reads the pool
        in place, one strided view of B rows, W blocks each (`PagedKVCache.run_fits`; padding rows continue
        the run, what they read is masked out), instead of gathering `tables`; a graph is kept per (B, W, run)."""
        (b, w), n, bs, top = shape, len(tokens), self.cache.block_size, len(self.rows)
        pad = b - n
        head = self.host[: 4 * top].reshape(4, top)
        head[:, :n] = (tokens, positions, slots, lengths)
        head[:, n:b] = np.array([0, 0, self.scratch * bs, 1])[:, None]  # padding rows: the scratch slot alone
        used = 4 * top
        if run is None:
            table = self.host[used : used + b * self.max_blocks].reshape(b, self.max_blocks)[:, :w]
            table[n:] = self.scratch
            table[:n, : tables.shape[1]] = tables
            table[:n, tables.shape[1] :] = self.scratch
            used += b * self.max_blocks
        self.inputs[:used].copy_(self.staging[:used], non_blocking=True)
        key = (b, w, run)
        graph = self.graphs.get(key) if self.use_graphs else None
        if graph is not None:
            graph.replay()
            self.stats["cuda_graph_replays"] += 1
            if key not in self.checked:  # its first replay on new inputs: does it read them?
                self._check_against_eager(key)
        elif self.use_graphs:
            self._capture(key)
        else:
            self._forward(key)
        self.stats["static_decode_steps"] += 1
        self.stats["static_decode_in_place_steps"] += run is not None
        self.stats["static_decode_padded_rows"] += pad
        return self.logits[:n]

    def _forward(self, key: tuple) -> None:
        """The step over the buffers' first `b` rows, `w` blocks of cache each (in place along `run`, or
        gathered by the tables), logits into `self.logits`."""
        (b, w, run), bs = key, self.cache.block_size
        embeds = self.language.model.embed_tokens(self.tokens[:b]).to(self.language.lm_head.weight.dtype)
        rows = self.rows[:b]
        if run is None and self.paged:  # each row read to its own length: no mask, no padding to the widest
            pieces = {"decodes": [DecodeGroup(rows=rows, blocks=self.tables[:b, :w], mask=None,
                                              lengths=self.lengths[:b])]}
        else:
            mask = (torch.arange(w * bs, device=self.device)[None] < self.lengths[:b, None])[:, None, None]
            pieces = ({"decodes": [DecodeGroup(rows=rows, blocks=self.tables[:b, :w], mask=mask)]} if run is None else
                      {"in_place": [InPlace(rows=rows, start=run[0], stride=run[1], length=w * bs, mask=mask)]})
        step = StepBatch(embeds=embeds, positions=self.positions[:b], slots=self.slots[:b], logit_rows=rows,
                         **pieces)
        self.logits[:b].copy_(forward_step(self.language, step, self.cache))

    def _capture(self, key: tuple) -> None:
        """Capture `key`'s step, replay it and check it against the eager step; any failure turns graphs
        off. Running the step more than once is harmless: it writes the same keys to the same slots."""
        b, t0 = key[0], time.perf_counter()
        try:
            graph, self.pool = capture(lambda: self._forward(key), self.device, self.pool)
            eager = self.logits[:b].clone()  # the warm-up's: a capture records kernels, it does not run them
            graph.replay()
            _agree(self.logits[:b], eager)  # reads the logits back: the time below includes the replay
        except Exception as e:  # noqa: BLE001 - graphs are an optimisation: fall back to eager steps
            self._fall_back(key, e, rerun=True)
            return
        finally:  # what capturing costs a run (warm-up, capture, check): benchmarks report it
            self.stats["cuda_graph_capture_ms"] += round((time.perf_counter() - t0) * 1000)
        if len(self.graphs) >= self.max_graphs:  # in-place layouts vary with admissions: keep the newest
            old = next(iter(self.graphs))
            del self.graphs[old]
            self.checked.discard(old)
        self.graphs[key] = graph
        self.stats["cuda_graph_captures"] += 1

    def _check_against_eager(self, key: tuple) -> None:
        """The graph's first replay after its capture, on the next step's inputs, against the eager step:
        a graph that read a stale input would still have passed the check at capture."""
        b = key[0]
        replayed = self.logits[:b].clone()
        self._forward(key)
        try:
            _agree(replayed, self.logits[:b])
        except RuntimeError as e:
            self._fall_back(key, e, rerun=False)  # the eager step's logits are in place
            return
        self.checked.add(key)

    def _fall_back(self, key: tuple, e: Exception, rerun: bool) -> None:
        b, w, run = key
        self.use_graphs = False
        where = f"batch {b}, width {w * self.cache.block_size}" + (f", in place from slot {run[0]}" if run else "")
        self.fallback = f"{where}: {type(e).__name__}: {e}"
        self.graphs.clear()
        self.stats["cuda_graph_fallbacks"] += 1
        log.warning("CUDA graphs turned off, decode steps run eagerly: %s", self.fallback)
        if rerun:
            self._forward(key)


def capture(fn, device: torch.device, pool) -> tuple[torch.cuda.CUDAGraph, object]:
    """`fn()` run once eagerly on a side stream (lazy state is made outside the graph), then captured as
    a CUDA graph in `pool` (a new pool when None). Returns the graph and the pool."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    pool = pool if pool is not None else torch.cuda.graph_pool_handle()
    graph = torch.cuda.CUDAGraph()
    # thread_local: other threads of the process (the pipeline's UDF) may use the device meanwhile
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        fn()
    return graph, pool


def _agree(got: torch.Tensor, want: torch.Tensor) -> None:
    """Graph and eager logits of one step agree up to rounding (kernels may differ in reduction order)."""
    diff = (got - want).abs().max().item()
    scale = want.abs().max().item()
    if not diff <= 1e-2 * scale + 1e-3:
        raise RuntimeError(f"graph replay differs from the eager step by {diff:.3g} (logits up to {scale:.3g})")
