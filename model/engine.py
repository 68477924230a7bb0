"""A request-level, continuous-batching generation engine for DeepSeek-VL2.

    engine = Engine(model, processor)                      # cache and limits planned from free memory
    results = engine.generate(prepared, SamplingParams(max_new_tokens=256))

or incrementally, from any thread (an async caller wraps the futures):

    engine.start()                                         # background step loop
    fut = engine.submit(prep, params)                      # concurrent.futures.Future[Result]

Each step: admit queued requests that fit (their tiles go through the vision tower together),
give every decoding sequence one token, fill the rest of the step's token budget with prefill
chunks (a prompt that fits the budget is not split: it waits for a step it fits whole), run the
decoder once over all of them (model/runner.py), sample each request with its own parameters, and
retire finished sequences so the next step refills their places. `model.generate` one request at a
time is the oracle: the tests hold the engine to its tokens. On CUDA a decode-only step runs at
bucketed shapes and is replayed as a CUDA graph (model/decode_graphs.py; `cuda_graphs=False`
runs every step eagerly, `static_decode=True` runs the bucketed steps eagerly, e.g. in tests on CPU).

Under expert parallelism (a model loaded with `expert_parallel=True`) every rank runs its own Engine on
its own requests and `step()` is collective: one all-reduce per step says whether any rank has tokens;
if one has, every rank runs the decoder pass (a rank with none runs a zero-token pass that only serves
its experts), so the all-to-alls line up. `generate()` on a rank returns when every rank's requests are
done (a rank with no requests passes `[]` and serves the others); the background loop polls the group
while idle and `close()` returns once every rank has closed.
"""
from __future__ import annotations

import collections
import itertools
import logging
import math
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .compiled_decode import CompiledDecode
from .compiled_decode import unsupported as compiled_unsupported
from .decode_graphs import StaticDecode
from .kv_cache import BlockAllocator, CachePlan, PagedKVCache, contiguous, plan_cache
from .language import join_weights
from .model import _real
from .paged_attention import available as paged_kernel_available
from .processor import PreparedInput
from .runner import (DecodeGroup, InPlace, Prefill, StepBatch, decode_groups, forward_step, length_mask,
                     strided_runs)
from .sampling import NgramGuard, SamplingParams, request_seed, sample, uniform

log = logging.getLogger(__name__)


@dataclass
class Result:
    tokens: list[int]  # the new ids, without the EOS
    finish_reason: str  # "eos" | "length" | "error"
    error: str | None = None
    prompt_tokens: int = 0
    guard_bans: int = 0  # steps at which the n-gram guard banned at least one token
    # milliseconds: waiting in the queue, admission to first token (vision + prefill), first token
    # to the end (decode), and submit to the end
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    total_ms: float = 0.0


@dataclass
class _Sequence:
    id: int
    prep: PreparedInput
    params: SamplingParams
    future: Future
    submitted: float
    prompt_len: int
    admitted: float = 0.0
    first_token: float = 0.0
    blocks: list[int] = field(default_factory=list)
    embeds: torch.Tensor | None = None  # [T, hidden] until the prompt is cached
    cached: int = 0  # tokens whose keys are in the cache
    tokens: list[int] = field(default_factory=list)
    seed: int | None = None  # what it samples with (None: greedy)
    image_rows: torch.Tensor | None = None  # [n, hidden] from a vision worker, else computed at admission
    row: int = -1  # this sequence's row in the engine's `seen` table (repetition penalty)
    guard: NgramGuard | None = None  # the no-repeat n-gram guard, when the request asks for one
    guard_bans: int = 0

    @property
    def prefilling(self) -> bool:
        return self.cached < self.prompt_len


class Engine:
    COMPILE_AT = 8  # sequences in a decode-only step that start the compiled CPU step by default (see below)

    def __init__(
        self,
        model,
        processor,
        *,
        kv_cache_tokens: int | None = None,
        memory_budget_bytes: int | None = None,
        memory_fraction: float = 0.85,
        max_seqs: int | None = None,
        max_step_tokens: int | None = None,
        block_size: int | None = None,
        vision_chunk: int | None = None,
        max_context: int | None = None,
        decode_waste: float = 0.25,
        in_place_decode: bool | None = None,
        reservation_granule: int | None = None,
        cuda_graphs: bool | None = None,
        static_decode: bool | None = None,
        paged_attention: bool | None = None,
        compiled_decode: bool | None = None,
    ):
        self.model = model
        self.processor = processor
        self.device = model.device
        self.dtype = model.dtype
        lang = model.language
        self.eos = model.cfg.language_config.eos_token_id
        self.max_context = max_context or model.cfg.language_config.max_position_embeddings
        if vision_chunk:
            model.vision_chunk = vision_chunk
        join_weights(lang)  # before the plan: joining moves the weights (see model.language.joined)
        shapes = [layer.self_attn.entry_shapes() for layer in lang.model.layers]
        self.plan: CachePlan = plan_cache(
            shapes, self.dtype, self.device, kv_cache_tokens=kv_cache_tokens,
            memory_budget_bytes=memory_budget_bytes, memory_fraction=memory_fraction, block_size=block_size,
            max_seqs=max_seqs, max_step_tokens=max_step_tokens)
        self.block_size = self.plan.block_size
        self.cache = PagedKVCache(shapes, self.plan.num_blocks, self.block_size, self.device, self.dtype)
        self.blocks = BlockAllocator(self.plan.num_blocks)
        self.usable_blocks = self.plan.num_blocks
        self.decode_waste = decode_waste
        # CPU: decode tokens whose sequences' caches are contiguous attend to them in place, one SDPA call
        # per run of evenly spaced reservations (reads the cache once; a gathered copy reads it three times).
        # CUDA: the paged kernel below (or, without it, grouped calls over gathered blocks).
        self.in_place_decode = self.device.type == "cpu" if in_place_decode is None else in_place_decode
        # CUDA: decode tokens not read along a strided run attend through the paged kernel, which reads each
        # sequence's blocks in place to its own length (no gathered, padded copy), where triton is present
        # and the kernel agrees with gathered SDPA on this model's layout (`_paged_check`, once, here)
        self.paged_fallback: str | None = None
        if paged_attention is None:
            paged_attention = self.device.type == "cuda" and paged_kernel_available()
            if paged_attention:
                try:
                    self._paged_check()
                except Exception as e:  # noqa: BLE001 - the kernel is an optimisation: gather instead
                    paged_attention = False
                    self.paged_fallback = f"{type(e).__name__}: {e}"
                    log.warning("paged decode attention off, decode gathers blocks: %s", self.paged_fallback)
        elif paged_attention and not paged_kernel_available():
            raise ValueError("paged_attention=True needs triton")
        self.paged_attention = bool(paged_attention)
        # CPU: decode-only steps of 2+ sequences go through one compiled function
        # (model/compiled_decode.py), where it covers this decoder; PAGEMILL_COMPILED_DECODE=0 turns the
        # default off (the test suite does: each new model would compile anew)
        why_not = (compiled_unsupported(lang) if getattr(model, "expert_parallel", None) is None
                   else "expert parallelism (its MoE holds collectives)")
        # by default the first compile waits for a decode-only step of COMPILE_AT sequences, a batch workload
        # that repays it (the README's 4-page sample run: 25 s eager; 58 s with the compile, 32 s with
        # inductor's disk cache warm); once compiled, every decode-only step of 2+ sequences takes it
        self._compile_at = 2 if compiled_decode else self.COMPILE_AT
        if compiled_decode is None:
            compiled_decode = (self.device.type == "cpu" and self.in_place_decode and why_not is None
                               and os.environ.get("PAGEMILL_COMPILED_DECODE", "1") != "0")
        elif compiled_decode and (why_not or self.device.type != "cpu"):
            raise ValueError(f"compiled_decode=True cannot run here: {why_not or 'it is for CPU devices'}")
        self._compiled: CompiledDecode | None = CompiledDecode.for_model(lang) if compiled_decode else None
        # reservations rounded up to `reservation_granule` tokens (default 512 where decode reads in place)
        granule = reservation_granule or (512 if self.in_place_decode else self.block_size)
        self.granule = max(1, math.ceil(granule / self.block_size))  # in blocks
        self._seen: torch.Tensor | None = None  # [max_seqs, vocab] bool, made on first use
        self._free_rows = list(range(self.plan.max_seqs - 1, -1, -1))
        # each running sequence's reservation (block ids) in its row, so that a step's block tables and slots
        # are numpy slices instead of Python lists (at 256 sequences a nested-list tensor took ~8 us a sequence)
        widest = min(-(-math.ceil(self.max_context / self.block_size) // self.granule) * self.granule,
                     self.usable_blocks)
        self._tables = np.zeros((self.plan.max_seqs, widest), dtype=np.int64)
        self._queue: collections.deque[_Sequence] = collections.deque()
        self._running: list[_Sequence] = []
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._step_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.stats = collections.Counter()
        # expert parallelism (model.expert_parallel.ExpertParallel) or None: steps are then collective
        self.ep = getattr(model, "expert_parallel", None)
        self.group_active = False  # EP: did the last step run a decoder pass on the group
        self._group_leaving = False  # EP: had every rank closed at the last step
        self.idle_poll_s = 0.005  # EP: how often an idle loop joins the group's step all-reduce
        # decode-only steps at bucketed shapes (model/decode_graphs.py), replayed as CUDA graphs on CUDA
        # (default there, except under EP, whose steps hold collectives); `static_decode` alone runs them eagerly
        if self.ep is not None and (cuda_graphs or static_decode):
            raise ValueError("CUDA graphs / static decode steps cannot run under expert parallelism: its steps hold "
                             "collectives every rank must join once")
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and self.ep is None and static_decode is not False
        self.static: StaticDecode | None = None
        self._static_eager = bool(static_decode)  # keep the bucketed steps if graphs fall back
        if cuda_graphs or static_decode:
            scratch = self.blocks.take_last()  # padding rows write here; no sequence owns it
            self.usable_blocks -= 1
            self.static = StaticDecode(lang, self.cache, scratch, self.plan.max_seqs,
                                       min(self.max_context, self.usable_blocks * self.block_size),
                                       graphs=bool(cuda_graphs), stats=self.stats, paged=self.paged_attention)

    @property
    def compiled(self) -> CompiledDecode | None:
        """The compiled CPU decode step this engine uses, None if off or if it failed (on this model, for any
        of its engines: it is shared, and not tried again)."""
        c = self._compiled
        return None if c is None or c.fallback else c

    @property
    def compiled_fallback(self) -> str | None:
        """Why the compiled step failed, if it did."""
        return self._compiled.fallback if self._compiled is not None else None

    # -- submission ------------------------------------------------------------------------------

    def submit(self, prep: PreparedInput, params: SamplingParams | None = None,
               image_rows: torch.Tensor | None = None) -> Future:
        """Queue one request; thread-safe. The future resolves to its `Result`. `image_rows`: the
        prompt's image placeholder rows when a vision worker computed them (see `image_rows`)."""
        params = params or SamplingParams()
        fut: Future = Future()
        seq = _Sequence(next(self._ids), prep, params, fut, time.perf_counter(), len(prep))
        seq.image_rows = image_rows
        seq.guard = NgramGuard(params) if params.no_repeat_ngram_size else None
        problem = self._never_fits(seq)
        if problem:
            fut.set_result(Result([], "error", problem, prompt_tokens=seq.prompt_len))
            return fut
        with self._wake:
            if self._closed:
                raise RuntimeError("engine is closed")
            self._queue.append(seq)
            self._wake.notify()
        return fut

    def _never_fits(self, seq: _Sequence) -> str | None:
        need = seq.prompt_len + seq.params.max_new_tokens
        if need > self.max_context:
            return (f"prompt ({seq.prompt_len} tokens) + max_new_tokens ({seq.params.max_new_tokens}) = {need} "
                    f"exceeds the model's context of {self.max_context} tokens")
        if self._blocks_for(seq) > self.usable_blocks:
            return (f"prompt ({seq.prompt_len} tokens) + max_new_tokens ({seq.params.max_new_tokens}) = {need} "
                    f"exceeds the KV cache of {self.usable_blocks * self.block_size} tokens")
        return None

    def _blocks_for(self, seq: _Sequence) -> int:
        return math.ceil((seq.prompt_len + seq.params.max_new_tokens) / self.block_size)

    def _reservation(self, seq: _Sequence) -> int:
        """Blocks reserved at admission: what the sequence can need, rounded up to the granule (so that
        similar requests get equal reservations, which first fit places evenly spaced), within the pool."""
        need = self._blocks_for(seq)
        return min(-(-need // self.granule) * self.granule, self.usable_blocks)  # need <= usable (submit)

    def generate(self, prepared: Sequence[PreparedInput],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Result]:
        """Run a list of requests to completion (in this thread unless the loop is started)."""
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prepared)
        if len(plist) != len(prepared):
            raise ValueError(f"{len(prepared)} requests but {len(plist)} SamplingParams")
        futs = [self.submit(p, sp) for p, sp in zip(prepared, plist)]
        if self._thread is None and self.ep is None:
            while not all(f.done() for f in futs):
                self.step()
        elif self._thread is None:  # collective: step until no rank has work (then ours is done too)
            self.step()
            while self.group_active:
                self.step()
        return [f.result() for f in futs]

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._queue or self._running)

    # -- background loop -----------------------------------------------------------------------

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="pagemill-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        if self.ep is not None:
            return self._loop_together()
        while True:
            with self._wake:
                while not self._closed and not (self._queue or self._running):
                    self._wake.wait()
                if self._closed:
                    break
            self.step()
        for seq in list(self._queue) + self._running:
            if not seq.future.done():
                seq.future.set_result(Result([], "error", "engine closed", prompt_tokens=seq.prompt_len))

    def _loop_together(self) -> None:
        """The EP loop: join every step of the group; when idle, poll it every `idle_poll_s` (a local
        submission wakes the loop at once). A closed rank fails its own requests and keeps serving the
        others until every rank has closed."""
        while True:
            with self._wake:
                if not self._closed and not self.group_active and not (self._queue or self._running):
                    self._wake.wait(self.idle_poll_s)
                leaving = self._closed
            if leaving:
                for seq in list(self._queue) + self._running:
                    self._finish(seq, "error", "engine closed")
                self._queue.clear()
            self.step(_leaving=leaving)
            if self._group_leaving and not self.group_active:
                return

    # -- one step ------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, *, _leaving: bool = False) -> int:
        """Admit, run one packed decoder pass, sample, retire. Returns the tokens processed.
        Collective under expert parallelism (every rank calls it, see the module docstring)."""
        with self._step_lock:
            self._admit()
            decoding = [s for s in self._running if not s.prefilling]
            budget = self.plan.max_step_tokens - len(decoding)
            chunks: list[tuple[_Sequence, int]] = []
            for s in self._running:
                if s.prefilling and budget > 0:
                    left = s.prompt_len - s.cached
                    if not s.cached and chunks and left > budget:
                        # a prompt starts where it fits whole (or first in a step, if no step can hold it): its
                        # attention is then one causal call, not a causal call plus one over a cached prefix
                        # (CPU, 16 catalog prompts of 1,457 tokens: prefill steps 390 -> 340 ms)
                        break
                    take = min(left, budget)
                    chunks.append((s, take))
                    budget -= take
            if self.ep is not None:
                self.group_active, self._group_leaving = self.ep.agree(bool(decoding or chunks), _leaving)
                if not self.group_active:
                    return 0
                if not decoding and not chunks:
                    self._zero_token_pass()
                    return 0
            elif not decoding and not chunks:
                return 0
            try:
                # under EP a failure inside the decoder pass leaves the group out of step: the others'
                # collectives then fail on the process group's timeout (the pipeline restarts the group)
                n = self._run(chunks, decoding)
            except Exception as e:  # noqa: BLE001 - fail the step's requests, keep the engine alive
                for s in {id(s): s for s in [c[0] for c in chunks] + decoding}.values():
                    self._finish(s, "error", f"generation failed: {type(e).__name__}: {e}")
                return 0
            return n

    def _zero_token_pass(self) -> None:
        """EP: this rank's part of a step it has no tokens for (its MoE layers serve the others)."""
        dev = self.device
        none = torch.empty(0, dtype=torch.long, device=dev)
        hidden = self.model.language.model.embed_tokens.weight.shape[1]
        forward_step(self.model.language, StepBatch(torch.empty(0, hidden, device=dev, dtype=self.dtype), none, none,
                                                    logit_rows=none), self.cache)
        self.stats["idle_steps"] += 1

    def _admit(self) -> None:
        """Move queued requests that fit into the running set; encode their images together."""
        backlog = sum(s.prompt_len - s.cached for s in self._running if s.prefilling)
        admitted: list[_Sequence] = []
        with self._lock:
            while self._queue and len(self._running) + len(admitted) < self.plan.max_seqs:
                seq = self._queue[0]
                if backlog >= 2 * self.plan.max_step_tokens:  # enough prefill work queued up already
                    break
                if self._reservation(seq) > self.blocks.free:
                    break  # FIFO: wait until finished sequences free blocks
                self._queue.popleft()
                seq.blocks = self.blocks.allocate(self._reservation(seq))
                seq.row = self._free_rows.pop()
                self._tables[seq.row, : len(seq.blocks)] = seq.blocks
                self._tables[seq.row, len(seq.blocks) :] = 0  # beyond the reservation: never read unmasked
                admitted.append(seq)
                backlog += seq.prompt_len
        if not admitted:
            return
        now = time.perf_counter()
        try:
            embeds = self._prompt_embeds([s.prep for s in admitted], [s.image_rows for s in admitted])
        except Exception:  # noqa: BLE001 - find the request(s) at fault one by one
            embeds = []
            for s in admitted:
                try:
                    embeds.extend(self._prompt_embeds([s.prep], [s.image_rows]))
                except Exception as e:  # noqa: BLE001
                    embeds.append(e)
        for s, e in zip(admitted, embeds):
            s.admitted = now
            self._running.append(s)
            if isinstance(e, Exception):
                self._finish(s, "error", f"image encoding failed: {type(e).__name__}: {e}")
                continue
            s.embeds = e
            s.seed = request_seed(s.params)
            if s.params.repetition_penalty != 1.0:
                seen = self._seen_table()
                seen[s.row] = False
                seen[s.row, s.prep.input_ids.to(self.device)] = True
            self.stats["admitted"] += 1

    def _seen_table(self) -> torch.Tensor:
        if self._seen is None:
            vocab = self.model.language.lm_head.weight.shape[0]
            self._seen = torch.zeros(self.plan.max_seqs, vocab, dtype=torch.bool, device=self.device)
        return self._seen

    def _prompt_embeds(self, preps: list[PreparedInput], given: list[torch.Tensor | None] | None = None
                       ) -> list[torch.Tensor]:
        """Each prompt's input embeddings [T, hidden], laid out exactly as `model.embed` does; the image
        rows from `given` where a vision worker computed them, else from one vision pass over the tiles
        of all the others."""
        given = given or [None] * len(preps)
        todo = [i for i, g in enumerate(given) if g is None]
        computed = dict(zip(todo, image_rows(self.model, [preps[i] for i in todo], self.processor)))
        out = []
        for i, p in enumerate(preps):
            e = self.model.language.model.embed_tokens(p.input_ids.to(self.device))
            rows = given[i] if given[i] is not None else computed[i]
            if rows is not None:
                # placeholder positions found on the host (the processor's mask lives there): counting or
                # indexing with a device mask would wait for the device (a host read; nonzero)
                where = p.images_seq_mask.cpu().nonzero()[:, 0]
                if len(where) != rows.shape[0]:
                    raise ValueError(f"{len(where)} image placeholders but {rows.shape[0]} image rows")
                e[where.to(self.device)] = rows.to(self.device, e.dtype)
            out.append(e)
        return out

    def _slots(self, rows: int | list[int], pos: np.ndarray) -> np.ndarray:
        """The flat cache slots of the tokens at `pos` of the sequences in table `rows` (one row, or one per
        position)."""
        return self._tables[rows, pos // self.block_size] * self.block_size + pos % self.block_size

    def _run(self, chunks: list[tuple[_Sequence, int]], decoding: list[_Sequence]) -> int:
        static = None if chunks else self._static_step(decoding)
        if static is None and not chunks and self.compiled is not None and len(decoding) >= self._compile_at:
            static = self._compiled_step(decoding)
            self._compile_at = 2
        if static is None:
            emit, logits, count = self._packed_step(chunks, decoding)
        else:
            logits, rows = static
            emit, count = [(s, i) for i, s in enumerate(rows)], len(rows)
        self.stats["steps"] += 1
        self.stats["prefill_tokens"] += sum(n for _, n in chunks)
        self.stats["decode_tokens"] += len(decoding)
        if not emit:  # only mid-prompt chunks this step
            return count
        self._sample(emit, logits)
        return count

    def _static_step(self, decoding: list[_Sequence]) -> tuple[torch.Tensor, list[_Sequence]] | None:
        """A decode-only step at bucketed shapes (CUDA graphs): its logits and the sequences of their rows;
        None when it has no bucket. Where decode reads in place and every sequence's reservation is one of an
        evenly spaced run, the rows go in slot order and attention reads the pool along that run."""
        if self.static is None or not decoding or (self.static.fallback and not self._static_eager):
            return None  # after a failed capture the packed step (decode groups) wastes less than the buckets
        bs = self.block_size
        lengths = [s.prompt_len + len(s.tokens) for s in decoding]  # cached tokens once this one is written
        shape = self.static.shape(len(decoding), -(-max(lengths) // bs))
        if shape is None:
            return None
        run = None
        if self.in_place_decode and all(contiguous(s.blocks) for s in decoding):
            starts = [s.blocks[0] * bs for s in decoding]
            runs = strided_runs(starts, lengths, math.inf, self.plan.tokens)
            if len(runs) == 1:
                order = runs[0]  # slot order
                first = starts[order[0]]
                stride = starts[order[1]] - first if len(order) > 1 else 0
                if self.cache.run_fits(first, stride, shape[0], shape[1] * bs):
                    decoding, lengths = [decoding[i] for i in order], [lengths[i] for i in order]
                    run = (first, stride)
        pos, rows = np.array(lengths) - 1, [s.row for s in decoding]
        logits = self.static.run(shape, [s.tokens[-1] for s in decoding], pos, self._slots(rows, pos),
                                 self._tables[rows, : shape[1]], lengths, run)
        return logits, decoding

    def _compiled_step(self, decoding: list[_Sequence]) -> tuple[torch.Tensor, list[_Sequence]] | None:
        """A decode-only step through the compiled CPU function (model/compiled_decode.py): its logits and the
        sequences of their rows; None if it failed (then the engine runs eagerly from here on)."""
        dev, bs = self.device, self.block_size
        lengths = np.array([s.prompt_len + len(s.tokens) for s in decoding])  # cached once this one is written
        pos, rows = lengths - 1, [s.row for s in decoding]
        last = torch.tensor([s.tokens[-1] for s in decoding], device=dev)
        logits = self.compiled(self.model.language.model.embed_tokens(last).to(self.dtype),
                               torch.from_numpy(pos).to(dev), torch.from_numpy(self._slots(rows, pos)).to(dev),
                               torch.from_numpy(self._tables[rows, : -(-int(lengths.max()) // bs)]).to(dev),
                               torch.from_numpy(lengths).to(dev), bs, self.cache)
        if logits is None:  # it failed: `compiled` is None from here on
            return None
        self.stats["compiled_decode_steps"] += 1
        return logits, decoding

    def _packed_step(self, chunks: list[tuple[_Sequence, int]], decoding: list[_Sequence]):
        """Any step: prompt chunks and decode tokens packed into one decoder pass (model/runner.py).
        Returns the (sequence, logit row) pairs to sample, the logits and the tokens processed."""
        dev, bs = self.device, self.block_size
        pieces, positions, slots, prefills, emit = [], [], [], [], []
        row = 0
        for s, n in chunks:
            pieces.append(s.embeds[s.cached : s.cached + n])
            positions.append(np.arange(s.cached, s.cached + n))
            slots.append(self._slots(s.row, positions[-1]))
            p = Prefill(row=row, n=n, start=s.cached)
            if s.cached:
                kv = s.cached + n
                nb = math.ceil(kv / bs)
                if contiguous(s.blocks):
                    p.view_start = s.blocks[0] * bs
                else:
                    # indexed by a list: a copy, not a view of a row that later admissions rewrite
                    p.blocks = torch.from_numpy(self._tables[[s.row], :nb]).to(dev)
            prefills.append(p)
            row += n
            if s.cached + n == s.prompt_len:
                emit.append((s, row - 1))
        if self.in_place_decode:  # in slot order, so that each run of evenly spaced caches is a slice of rows
            decoding = sorted(decoding, key=lambda s: (not contiguous(s.blocks), s.blocks[0]))
        if decoding:
            last = torch.tensor([s.tokens[-1] for s in decoding], device=dev)
            pieces.append(self.model.language.model.embed_tokens(last).to(self.dtype))
        groups = []
        lengths, gathered = [], []
        here = []  # (row, first slot, cached length) of the tokens read in place
        fed = []  # the position of each decode token
        for i, s in enumerate(decoding):
            pos = s.prompt_len + len(s.tokens) - 1
            fed.append(pos)
            emit.append((s, row + i))
            if self.in_place_decode and contiguous(s.blocks):
                here.append((row + i, s.blocks[0] * bs, pos + 1))
            else:
                lengths.append(pos + 1)
                gathered.append(i)
        if decoding:
            positions.append(np.array(fed))
            slots.append(self._slots([s.row for s in decoding], positions[-1]))
        in_place = self._in_place_groups(here)
        self.stats["in_place_runs"] += len(in_place)
        self.stats["in_place_tokens"] += len(here)
        if self.paged_attention and lengths:  # one call; the kernel reads each sequence to its own length
            nb = math.ceil(max(lengths) / bs)
            table = self._tables[[decoding[i].row for i in gathered], :nb]
            groups.append(DecodeGroup(rows=torch.tensor([row + i for i in gathered], device=dev),
                                      blocks=torch.from_numpy(table).to(dev), mask=None,
                                      lengths=torch.tensor(lengths, device=dev)))
            self.stats["paged_decode_tokens"] += len(lengths)
        elif lengths:
            for g in decode_groups(lengths, self.decode_waste):
                nb = math.ceil(max(lengths[i] for i in g) / bs)
                table = self._tables[[decoding[gathered[i]].row for i in g], :nb]
                groups.append(DecodeGroup(rows=torch.tensor([row + gathered[i] for i in g], device=dev),
                                          blocks=torch.from_numpy(table).to(dev),
                                          mask=length_mask([lengths[i] for i in g], nb * bs, dev)))
        step = StepBatch(
            embeds=torch.cat(pieces).to(self.dtype),
            positions=torch.from_numpy(np.concatenate(positions)).to(dev),
            slots=torch.from_numpy(np.concatenate(slots)).to(dev),
            prefills=prefills,
            decodes=groups,
            in_place=in_place,
            logit_rows=(slice(0, row + len(decoding)) if not chunks else
                        torch.tensor([r for _, r in emit], device=dev, dtype=torch.long)),
        )
        logits = forward_step(self.model.language, step, self.cache)
        for s, n in chunks:
            s.cached += n
            if not s.prefilling:
                s.embeds = None
        return emit, logits, step.positions.shape[0]

    def _sample(self, emit: list[tuple[_Sequence, int]], logits: torch.Tensor) -> None:
        """Sample each emitting sequence's next token with its own parameters; retire finished ones."""
        dev = self.device
        seqs = [s for s, _ in emit]
        banned = [s.guard.banned(s.tokens) if s.guard else [] for s in seqs]
        seen = seen_rows = None
        if any(s.params.repetition_penalty != 1.0 for s in seqs):
            seen_rows = torch.tensor([s.row for s in seqs], device=dev)
            seen = self._seen_table()[seen_rows]
        draws = [None if s.seed is None else uniform(s.seed, len(s.tokens)) for s in seqs]
        nxt = sample(logits, [s.params for s in seqs], draws, seen, banned)
        if seen_rows is not None:
            self._seen_table()[seen_rows, nxt] = True
        now = time.perf_counter()
        for s, t, b in zip(seqs, nxt.tolist(), banned):  # the step's one host sync
            s.guard_bans += bool(b)
            if not s.tokens:
                s.first_token = now
            if t == self.eos and not s.params.ignore_eos:
                self._finish(s, "eos")
                continue
            s.tokens.append(t)
            if len(s.tokens) >= s.params.max_new_tokens:
                self._finish(s, "length")

    def _in_place_groups(self, here: list[tuple[int, int, int]]) -> list[InPlace]:
        """Decode tokens read in place, grouped into evenly spaced runs (one strided view each). `here` comes in
        slot order (see `_packed_step`), which `strided_runs` keeps: a run is consecutive entries of it, so its
        rows are a slice, not an index."""
        out = []
        for run in strided_runs([h[1] for h in here], [h[2] for h in here], self.decode_waste, self.plan.tokens):
            rows, starts, lens = zip(*(here[i] for i in run))
            length = max(lens)
            out.append(InPlace(rows=slice(rows[0], rows[0] + len(rows)), start=starts[0],
                               stride=starts[1] - starts[0] if len(run) > 1 else 0, length=length,
                               mask=length_mask(list(lens), length, self.device) if min(lens) != length else None))
        return out

    def _paged_check(self) -> None:
        """The paged kernel against gathered SDPA on this model's first attention layer, in its dtype and
        block size, on random entries: raises unless they agree (a Triton or driver problem shows here,
        before any request depends on it)."""
        attn = self.model.language.model.layers[0].self_attn
        bs, dev = self.block_size, self.device
        cache = PagedKVCache([attn.entry_shapes()], 8, bs, dev, self.dtype)
        lengths = [1, 3 * bs + 5]
        tables = torch.tensor([[6, 0, 0, 0], [2, 7, 1, 4]], device=dev)
        gen = torch.Generator(device=dev).manual_seed(0)  # its own: the check leaves torch's global RNG alone
        with torch.inference_mode():
            for c in cache.layers[0]:
                c.normal_(generator=gen)
            hidden = self.model.language.model.embed_tokens.weight.shape[1]
            x = torch.randn(1, 2, hidden, device=dev, dtype=self.dtype, generator=gen)
            q = attn.project(x, torch.tensor([[5, 3 * bs + 4]], device=dev))[0][0].transpose(0, 1)  # [2, H, d]
            got = attn.core_paged(q, cache.layers[0], tables, torch.tensor(lengths, device=dev), bs)
            k, v = attn.kv_from_tokens(cache.gather(0, tables))
            want = attn.core(q[:, :, None], k, v, mask=length_mask(lengths, tables.shape[1] * bs, dev))[:, 0]
        diff, scale = (got.float() - want.float()).abs().max().item(), want.float().abs().max().item()
        if not diff <= 2e-2 * scale + 1e-3:
            raise RuntimeError(f"paged kernel differs from gathered SDPA by {diff:.3g} (outputs up to {scale:.3g})")

    def _finish(self, s: _Sequence, reason: str, error: str | None = None) -> None:
        if s in self._running:
            self._running.remove(s)
        if s.blocks:
            self.blocks.release(s.blocks)
            s.blocks = []
        if s.row >= 0:
            self._free_rows.append(s.row)
            s.row = -1
        s.embeds = None
        now = time.perf_counter()
        first = s.first_token or now
        admitted = s.admitted or now
        ms = 1000.0
        result = Result(
            tokens=list(s.tokens) if reason != "error" else [],
            finish_reason=reason, error=error, prompt_tokens=s.prompt_len, guard_bans=s.guard_bans,
            queue_ms=(admitted - s.submitted) * ms, prefill_ms=(first - admitted) * ms,
            decode_ms=(now - first) * ms, total_ms=(now - s.submitted) * ms)
        if not s.future.done():
            s.future.set_result(result)


def image_rows(model, preps: Sequence[PreparedInput], processor=None) -> list[torch.Tensor | None]:
    """Each prompt's image placeholder rows [n, hidden] (None without an image): all prompts' tiles in one
    vision pass (bounded chunks of `model.vision_chunk` tiles). The engine's admission uses it, and so
    does a separate vision worker, whose rows the engine then takes as given. Tiles given as uint8 pixels
    move to the device as such and are normalized there (`processor.normalize_pixels`)."""
    crops = [list(_real(p.images_spatial_crop.tolist())) for p in preps]
    counts = [sum(1 + w * h for w, h in c) for c in crops]
    tiles = [_device_tiles(p.images[:c], model.device, processor) for p, c in zip(preps, counts) if c]
    if not tiles:
        return [None] * len(preps)
    return model.rows_by_sequence(model.encode_tiles(tiles), crops)


def _device_tiles(tiles: torch.Tensor, device: torch.device, processor) -> torch.Tensor:
    """Float32 (or model-dtype) tiles on `device`; uint8 pixels are moved first and normalized there."""
    if tiles.dtype != torch.uint8:
        return tiles.to(device)
    if processor is None:
        raise ValueError("uint8 pixel tiles need the processor (its image mean and std) to be normalized")
    return processor.normalize_pixels(tiles.to(device))
