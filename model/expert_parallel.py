"""Expert parallelism: the routed experts of every MoE layer sharded over a torch.distributed group.

Rank r of N owns routed experts [r·E//N, (r+1)·E//N). Attention, the dense layers, the gate and the
shared experts stay replicated and every rank runs its own sequences (data-parallel attention); per
MoE layer the rank routes its tokens with the model's gate, sends each (token, expert) pair to the
expert's owner with an all-to-all, the owner runs them through its local stacked `Experts`, and the
results come back the same way to be combined with the gate weights.

Every decoder call is therefore collective. `ExpertParallel` keeps the group in lock step: before each
decoder call the ranks all-reduce "anyone still running"; a rank with nothing to run (it passed None,
or its sequences are finished) runs zero-token steps that only serve its experts to the others. An
engine drives a step the same way: `step_together(has_tokens)`, then either the decoder on this rank's
packed tokens (any number, one-token decode included) or `idle_step()`.
"""
from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .language import Experts, MoE


def rendezvous_store(host: str = "127.0.0.1") -> dist.TCPStore:
    """A group's rendezvous, held by the calling process on a port the OS picks (no window for another
    process to take it, as a probed "free" port would leave). Keep it alive until the ranks are done."""
    return dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)


def join_group(rank: int, world: int, port: int, timeout_s: float, backend: str = "gloo",
               host: str = "127.0.0.1") -> None:
    """Join the process group whose rendezvous `rendezvous_store` holds at host:port."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


def leave_group() -> None:
    """Leave the process group `join_group` joined, every rank together: a barrier first, so that no rank
    tears its connections down while a peer is still in the last collective (which can abort the peer:
    "terminate called without an active exception", seen once in a few dozen gloo runs)."""
    dist.barrier()
    dist.destroy_process_group()


def expert_bounds(num_experts: int, world: int) -> list[int]:
    """First expert of each rank, then E: rank r owns [bounds[r], bounds[r+1])."""
    return [r * num_experts // world for r in range(world + 1)]


@dataclass
class Exchange:
    """One MoE layer call as this rank saw it: rows sent to / received from each rank, and the
    seconds spent in the three all-to-alls (counts, dispatch, combine)."""

    sent: list[int]
    received: list[int]
    seconds: float


@dataclass
class Traffic:
    """Opt-in record of every exchange (benchmarks and tests); None on the layers costs nothing."""

    exchanges: list[Exchange] = field(default_factory=list)


class ExpertParallelMoE(nn.Module):
    """Drop-in for `MoE` holding only this rank's routed experts; parameter names stay the checkpoint's
    (`gate`, `experts`, `shared_experts`), with `experts` indexed from `first`."""

    def __init__(self, moe: MoE, group: dist.ProcessGroup | None = None):
        super().__init__()
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        num, inner, hidden = moe.experts.gate_proj.shape
        if num < self.world:
            raise ValueError(f"expert parallelism over {self.world} ranks needs at least as many routed experts, "
                             f"the model has {num}")
        self.num_experts, self.hidden = num, hidden
        self.bounds = expert_bounds(num, self.world)
        self.first = self.bounds[self.rank]
        self.gate, self.shared_experts = moe.gate, moe.shared_experts
        with torch.device(moe.experts.gate_proj.device):  # meta when sharding a model being built
            self.experts = Experts(self.bounds[self.rank + 1] - self.first, hidden, inner)
        self.traffic: Traffic | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if flat.shape[0] == 0:  # a zero-token step: only serve the other ranks
            none = torch.empty(0, self.gate.top_k, dtype=torch.long, device=x.device)
            return self._routed(flat, none, none.float()).view(shape)
        idx, weight = self.gate(flat)
        y = self._routed(flat, idx, weight).view(shape)
        return y + self.shared_experts(x) if self.shared_experts is not None else y

    def _routed(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Σ_k weight·expert_k(x) over the group, as `Experts.forward` computes it in one process."""
        m, k = idx.shape
        flat = idx.flatten()
        order = flat.argsort(stable=True)  # pairs grouped by expert, hence by owning rank
        counts = torch.bincount(flat, minlength=self.num_experts)
        local = self.bounds[self.rank + 1] - self.first
        recv_counts = torch.empty(self.world * local, dtype=counts.dtype, device=counts.device)
        clock = _Clock(self.traffic is not None, self.gate.weight.device.type == "cuda")
        with clock:
            dist.all_to_all_single(recv_counts, counts, [local] * self.world,
                                   [b - a for a, b in zip(self.bounds, self.bounds[1:])], group=self.group)
            host = torch.cat([counts, recv_counts]).tolist()  # the one host sync: split sizes are host ints
        sent = [sum(host[a:b]) for a, b in zip(self.bounds, self.bounds[1:])]
        got = [sum(host[self.num_experts + s * local : self.num_experts + (s + 1) * local]) for s in range(self.world)]

        tokens = x[order // k]
        received = x.new_empty(sum(got), self.hidden)
        with clock:
            dist.all_to_all_single(received, tokens, got, sent, group=self.group)
        if received.shape[0]:
            # received rows come per source rank, each sorted by local expert
            experts = torch.arange(local, device=x.device).repeat(self.world).repeat_interleave(
                recv_counts, output_size=received.shape[0])  # size given: no second host sync
            ones = torch.ones(received.shape[0], 1, dtype=torch.float32, device=x.device)
            received = self.experts(received, experts[:, None], ones)  # weight 1: exact in any dtype
        back = torch.empty_like(tokens)
        with clock:
            dist.all_to_all_single(back, received, sent, got, group=self.group)
        if self.traffic is not None:
            self.traffic.exchanges.append(Exchange(sent, got, clock.seconds))

        y = torch.empty_like(back)
        y[order] = back
        return (y.view(m, k, self.hidden).float() * weight[..., None]).sum(1).to(x.dtype)


class _Clock:
    """When on, sums the seconds spent inside its `with` blocks (after a device sync on CUDA, so work
    queued before a collective is not counted as the collective's); when off, costs nothing."""

    def __init__(self, on: bool, cuda: bool):
        self.on, self.sync, self.seconds, self._t = on, on and cuda, 0.0, 0.0

    def __enter__(self) -> None:
        if self.sync:
            torch.cuda.synchronize()
        if self.on:
            self._t = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self.sync:
            torch.cuda.synchronize()
        if self.on:
            self.seconds += time.perf_counter() - self._t


class ExpertParallel:
    """A sharded model's group: keeps its ranks stepping together and serves experts on idle steps."""

    def __init__(self, layers: list[ExpertParallelMoE], group: dist.ProcessGroup | None = None):
        self.layers, self.group = layers, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)

    @property
    def device(self) -> torch.device:
        return self.layers[0].gate.weight.device

    def step_together(self, active: bool) -> bool:
        """All-reduce "this rank runs a decoder step now"; True while any rank does."""
        return self.agree(active)[0]

    def agree(self, active: bool, leaving: bool = False) -> tuple[bool, bool]:
        """One all-reduce: (any rank runs a decoder step now, every rank is leaving). The engine's loop
        uses the second to close the group together."""
        flags = torch.tensor([int(active), int(not leaving)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        any_active, anyone_staying = flags.tolist()
        return bool(any_active), not anyone_staying

    def idle_step(self) -> None:
        """This rank's part of a step it has no tokens for: every MoE layer, in order, with zero tokens."""
        empty = torch.empty(0, self.layers[0].hidden, device=self.device, dtype=self.layers[0].gate.weight.dtype)
        with torch.inference_mode():
            for layer in self.layers:
                layer(empty)

    def finish(self) -> None:
        """Serve the others' remaining steps until no rank runs one."""
        while self.step_together(False):
            self.idle_step()

    def record(self) -> Traffic:
        """Start recording every exchange of this rank (one Traffic shared by all layers)."""
        traffic = Traffic()
        for layer in self.layers:
            layer.traffic = traffic
        return traffic


def shard_experts(model: nn.Module, device: torch.device, group: dist.ProcessGroup | None = None) -> ExpertParallel:
    """Swap every `MoE` of `model.language` for an `ExpertParallelMoE` over `group` (default: the world),
    for a model that will live on `device`.

    Meant for a model still on the meta device (the loader calls it before allocating storage), so no
    rank ever holds the other ranks' experts."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert_parallel=True needs an initialized torch.distributed process group "
                           "(call torch.distributed.init_process_group first)")
    _check_backend(group, device)
    layers = []
    for layer in model.language.model.layers:
        if isinstance(layer.mlp, MoE):
            if layer.mlp.experts.gate_proj.device.type != "meta":
                raise ValueError("shard_experts expects a model built on the meta device (use load_pretrained(..., "
                                 "expert_parallel=True)); this one already holds every expert")
            layer.mlp = ExpertParallelMoE(layer.mlp, group)
            layers.append(layer.mlp)
    if not layers:
        raise ValueError("expert_parallel=True but the model has no MoE layer to shard")
    model.expert_parallel = ExpertParallel(layers, group)
    return model.expert_parallel


def _check_backend(group: dist.ProcessGroup | None, device: torch.device) -> None:
    """all_to_all needs NCCL for CUDA tensors and gloo for CPU ones; say so before the first step hangs."""
    backend = str(dist.get_backend(group))
    need = "nccl" if device.type == "cuda" else "gloo"
    if need not in backend:
        raise ValueError(f"expert parallelism on {device.type} needs a {need!r} process group, this one is {backend!r}")
