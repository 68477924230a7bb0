"""DeepSeekMoE decoder (DeepseekV2ForCausalLM as DeepSeek-VL2 uses it).

Module names mirror the checkpoint's `language.*` keys, except that routed experts are stacked
into `[num_experts, out, in]` tensors (gpt-fast style): grouping tokens by expert and sharding
experts across devices then become slicing. The loader maps `experts.{e}.*` onto them.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import LanguageConfig
from .paged_attention import paged_decode


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# ---------------------------------------------------------------------------------------------
# rotary embeddings


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class Rotary(nn.Module):
    """cos/sin tables computed on the fly from position ids (float32, like the reference)."""

    def __init__(self, dim: int, theta: float, scaling: dict | None = None):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
        self.mscale = 1.0
        if scaling is not None:  # yarn, as DeepseekV2YarnRotaryEmbedding
            factor = scaling["factor"]
            orig = scaling.get("original_max_position_embeddings", 4096)
            beta_fast, beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)

            def corr(rot: float) -> float:
                return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))

            low, high = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), dim - 1)
            if low == high:
                high += 0.001
            ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
            extra_mask = 1.0 - ramp
            inv_freq = (inv_freq / factor) * (1 - extra_mask) + inv_freq * extra_mask
            self.mscale = _yarn_mscale(factor, scaling.get("mscale", 1)) / _yarn_mscale(
                factor, scaling.get("mscale_all_dim", 0)
            )
        # a plain float32 attribute, not a buffer: it must survive meta-device construction and
        # casting the model to bfloat16 untouched
        self.inv_freq = inv_freq
        self._on: dict[torch.device, torch.Tensor] = {}

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self._on.get(positions.device)
        if inv is None:
            inv = self._on[positions.device] = self.inv_freq.to(positions.device)
        freqs = positions.float()[..., None] * inv
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, q, dim]
        cos, sin = emb.cos() * self.mscale, emb.sin() * self.mscale
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]  # [B, 1, q, dim]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """NeoX rotate-half; `interleaved` first regroups (x0,x1),(x2,x3)… pairs into halves, as MLA does."""
    if interleaved:
        b, h, s, d = x.shape
        x = x.view(b, h, s, d // 2, 2).transpose(4, 3).reshape(b, h, s, d)
    return x * cos + _rotate_half(x) * sin


def joined(owner: nn.Module, key: str, params: list[torch.Tensor], dim: int) -> torch.Tensor:
    """`params` as one tensor joined along `dim`, for one matrix product where there were several (q/k/v,
    an expert's gate/up). The first call joins them and rebinds each parameter as a view of the joined
    tensor, kept on `owner` under `key`, so nothing is held twice; later calls check that they still are
    views of it (a `.to()` or a reload gives parameters their own storage again: they are joined anew)."""
    whole = owner.__dict__.get("_joined", {}).get(key)
    if whole is not None and torch.compiler.is_compiling():
        return whole  # tracing cannot read addresses; what is compiled ran after the engine joined every product
    if whole is not None and whole.dtype == params[0].dtype and whole.device == params[0].device:
        offset = 0
        for p in params:
            if p.data_ptr() != whole.data_ptr() + offset * whole.element_size():
                break
            offset += p.shape[dim] * whole.stride(dim)
        else:
            return whole
    with torch.inference_mode(False), torch.no_grad():  # a plain tensor: loading may copy_ into the views
        whole = torch.cat([p.detach() for p in params], dim)
        start = 0
        for p in params:
            p.data = whole.narrow(dim, start, p.shape[dim])
            start += p.shape[dim]
    owner.__dict__.setdefault("_joined", {})[key] = whole
    return whole


def join_weights(module: nn.Module) -> None:
    """Join every joinable product below `module` now (the engine does, before it plans its cache from the
    free memory: joining holds a layer's weights twice for a moment, and then once in their new place)."""
    for m in module.modules():
        if callable(getattr(m, "joined", None)):
            m.joined()


# ---------------------------------------------------------------------------------------------
# attention


@dataclass
class LayerCache:
    """Preallocated per-layer cache; MHA keeps (k, v), MLA keeps (latent, k_pe)."""

    a: torch.Tensor
    b: torch.Tensor


class MHAttention(nn.Module):
    """LlamaAttention as the tiny model uses it: head_dim = hidden / heads, NeoX RoPE."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.rotary = Rotary(self.head_dim, cfg.rope_theta)

    def new_cache(self, batch: int, length: int, device, dtype) -> LayerCache:
        shape = (batch, self.kv_heads, length, self.head_dim)
        return LayerCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def project(self, x: torch.Tensor, positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x [B,q,H] -> q [B,H,q,D] and the cache entries (k, v), each [B,kv_heads,q,D], roped. `rope`: this
        layer's `rotary(positions, dtype)` when the caller made it once for every layer (they are all alike)."""
        b, q_len, _ = x.shape
        q = self.q_proj(x).view(b, q_len, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, q_len, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, q_len, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope if rope is not None else self.rotary(positions, q.dtype)
        return apply_rope(q, cos, sin, False), (apply_rope(k, cos, sin, False), v)

    def project_packed(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """`project` for the engine's packed rows: x [N, hidden] -> q [1, H, N, D] and per-token entries
        (k, v), each [N, kv_heads, D], with one product for q, k and v (their weights joined) and one rotary
        pass over q and k together. The same bits as `project` (tested); on CPU ~20 us less per layer
        and step at 16 tokens."""
        n, h, kv = x.shape[0], self.heads, self.kv_heads
        y = F.linear(x, *self.joined()).view(n, h + 2 * kv, self.head_dim)
        cos, sin = (t[0, 0][:, None] for t in rope)  # [N, 1, D]
        qk = apply_rope(y[:, : h + kv], cos, sin, False)
        return qk[:, :h].transpose(0, 1)[None], (qk[:, h:], y[:, h + kv :])

    def joined(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q, k and v's weights (and biases) as one [(H + 2 kv_heads) * D, hidden] product."""
        w = joined(self, "qkv", [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight], 0)
        if self.q_proj.bias is None:
            return w, None
        return w, joined(self, "qkv_bias", [self.q_proj.bias, self.k_proj.bias, self.v_proj.bias], 0)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None, is_causal: bool = False):
        """q [B,H,q,D]; k, v [B,kv_heads,kv,D] -> attention output projected [B,q,hidden]."""
        return self.o_proj(self.core(q, k, v, mask, is_causal))

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None, is_causal: bool = False):
        """Attention before o_proj: [B, q, heads * D] (the engine projects all its pieces at once)."""
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.head_dim**-0.5)
        return y.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    def core_continued(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`core` for a prompt chunk whose first `k.shape[2] - q.shape[2]` keys are the cached prefix (the
        lower-right causal case), without a mask: one flash call over the prefix (nothing masked), one
        `is_causal` call over the chunk itself, joined by their log-sum-exps. A masked call computes every
        masked-out block too; this does ~35% less work for a 1,024-token chunk after 357 cached tokens
        (2.1 vs 3.2 ms on CPU). CPU only (`continued_in_two`): the op is the CPU flash kernel's."""
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        start, scale = k.shape[2] - q.shape[2], self.head_dim**-0.5
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        old, old_lse = flash(q, k[:, :, :start], v[:, :, :start], 0.0, False, scale=scale)
        own, own_lse = flash(q, k[:, :, start:], v[:, :, start:], 0.0, True, scale=scale)
        # softmax over both parts = each part's output weighted by its share of the total exp-sum
        y = torch.lerp(own, old, torch.sigmoid(old_lse - own_lse)[..., None].to(own.dtype))
        return y.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    @staticmethod
    def continued_in_two(device: torch.device, dtype: torch.dtype) -> bool:
        """Whether `core_continued` runs here: float32 on CPU, with the flash kernel's log-sum-exp."""
        return device.type == "cpu" and dtype == torch.float32 and _cpu_flash_lse()

    # the engine's paged cache stores one entry per token: k and v, each [kv_heads, D]
    def entry_shapes(self) -> tuple[tuple[int, ...], ...]:
        return (self.kv_heads, self.head_dim), (self.kv_heads, self.head_dim)

    def core_paged(self, q: torch.Tensor, pool: tuple[torch.Tensor, ...], tables: torch.Tensor,
                   lengths: torch.Tensor, block_size: int) -> torch.Tensor:
        """Decode attention read in place from the engine's pool (k, v [kv_heads, slots, D]) through block
        tables: q [G, H, D] -> [G, H * D] (`core`'s result for one token per sequence)."""
        k, v = pool
        y = paged_decode(q, k, v, tables, lengths, block_size, self.head_dim**-0.5)
        return y.reshape(q.shape[0], -1)

    @staticmethod
    def token_entries(entries: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """`project`'s entries for B=1 -> per-token rows [q, kv_heads, D]."""
        return tuple(e[0].transpose(0, 1) for e in entries)

    @staticmethod
    def kv_from_tokens(entries: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Gathered per-token rows [G, L, kv_heads, D] -> attention's (k, v) [G, kv_heads, L, D]."""
        k, v = entries
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, positions, mask, cache: LayerCache | None, start: int):
        q, (k, v) = self.project(x, positions)
        q_len = x.shape[1]
        if cache is not None:
            cache.a[:, :, start : start + q_len] = k
            cache.b[:, :, start : start + q_len] = v
            k, v = cache.a[:, :, : start + q_len], cache.b[:, :, : start + q_len]
        return self.attend(q, k, v, mask)


class MLAttention(nn.Module):
    """Multi-head latent attention. The cache holds the normalised latent and the shared rope key;
    kv_b_proj is absorbed into the query and the output, as in the reference's eager path."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        q_out = self.heads * (self.nope + self.rope)
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, self.rank + self.rope, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.rank)
        self.kv_b_proj = nn.Linear(self.rank, self.heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.heads * self.v_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.rotary = Rotary(self.rope, cfg.rope_theta, cfg.rope_scaling)
        self.scale = (self.nope + self.rope) ** -0.5
        if cfg.rope_scaling is not None and cfg.rope_scaling.get("mscale_all_dim", 0):
            m = _yarn_mscale(cfg.rope_scaling["factor"], cfg.rope_scaling["mscale_all_dim"])
            self.scale *= m * m

    def new_cache(self, batch: int, length: int, device, dtype) -> LayerCache:
        return LayerCache(
            torch.zeros(batch, length, self.rank, device=device, dtype=dtype),
            torch.zeros(batch, length, self.rope, device=device, dtype=dtype),
        )

    def project(self, x: torch.Tensor, positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x [B,q,H] -> the absorbed query [B,H,q,rank+rope] and the cache entries (latent [B,q,rank],
        roped k_pe [B,q,rope]). `rope` as in `MHAttention.project`."""
        b, q_len, _ = x.shape
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, q_len, self.heads, self.nope + self.rope).transpose(1, 2)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)
        cos, sin = rope if rope is not None else self.rotary(positions, q.dtype)
        q_pe = apply_rope(q_pe, cos, sin, True)
        k_pe = apply_rope(k_pe[:, None], cos, sin, True)[:, 0]
        w = self.kv_b_proj.weight.view(self.heads, self.nope + self.v_dim, self.rank)
        q_lat = q_nope @ w[:, : self.nope]  # [B,H,q,rank]
        return torch.cat([q_lat, q_pe], dim=-1), (latent, k_pe)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None, is_causal: bool = False):
        """q [B,H,q,rank+rope]; k [B,1,kv,rank+rope]; v [B,1,kv,rank] -> projected [B,q,hidden]."""
        return self.o_proj(self.core(q, k, v, mask, is_causal))

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None, is_causal: bool = False):
        """Attention before o_proj, [B, q, heads * v_dim]; k, v: one latent head shared by all.

        The latent is one key/value head for every query head (MQA), so the heads fold into the
        query rows of one matmul: the cache is read once, never expanded per head (SDPA would
        materialize the expanded keys)."""
        b, h, q_len, d = q.shape
        kv = k.shape[2]
        scores = torch.matmul(q.reshape(b, h * q_len, d), k[:, 0].transpose(1, 2)).view(b, h, q_len, kv)
        if is_causal:
            mask = torch.ones(q_len, kv, dtype=torch.bool, device=q.device).tril(kv - q_len)
        if mask is not None and mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        elif mask is not None:  # additive (0 / -inf)
            scores = scores + mask
        p = (scores.float() * self.scale).softmax(-1).to(q.dtype)
        y = torch.matmul(p.view(b, h * q_len, kv), v[:, 0]).view(b, h, q_len, -1)
        w = self.kv_b_proj.weight.view(self.heads, self.nope + self.v_dim, self.rank)
        y = y @ w[:, self.nope :].transpose(1, 2)  # [B,H,q,v_dim]
        return y.transpose(1, 2).reshape(b, q.shape[2], -1)

    # the engine's paged cache stores one entry per token: the latent [rank] and the roped k_pe [rope]
    def entry_shapes(self) -> tuple[tuple[int, ...], ...]:
        return (self.rank,), (self.rope,)

    def core_paged(self, q: torch.Tensor, pool: tuple[torch.Tensor, ...], tables: torch.Tensor,
                   lengths: torch.Tensor, block_size: int) -> torch.Tensor:
        """Decode attention read in place from the engine's pool (latent [slots, rank], k_pe [slots, rope])
        through block tables: the absorbed q [G, H, rank + rope] -> [G, H * v_dim]. The latent is the one
        kv head of every query head and its value too, so each latent row is read once for all heads."""
        latent, k_pe = pool
        y = paged_decode(q[..., : self.rank], latent[None], None, tables, lengths, block_size, self.scale,
                         q_rope=q[..., self.rank :], k_rope=k_pe)  # [G, H, rank]
        w = self.kv_b_proj.weight.view(self.heads, self.nope + self.v_dim, self.rank)
        y = (y.transpose(0, 1) @ w[:, self.nope :].transpose(1, 2)).transpose(0, 1)  # [G, H, v_dim]
        return y.reshape(q.shape[0], -1)

    @staticmethod
    def token_entries(entries: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(e[0] for e in entries)

    @staticmethod
    def kv_from_tokens(entries: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent [G,L,rank], k_pe [G,L,rope]) -> attention's (k, v) with one latent head shared by all."""
        latent, k_pe = entries
        return torch.cat([latent, k_pe], dim=-1)[:, None], latent[:, None]

    def forward(self, x, positions, mask, cache: LayerCache | None, start: int):
        q, (latent, k_pe) = self.project(x, positions)
        q_len = x.shape[1]
        if cache is not None:
            cache.a[:, start : start + q_len] = latent
            cache.b[:, start : start + q_len] = k_pe
            latent, k_pe = cache.a[:, : start + q_len], cache.b[:, : start + q_len]
        k, v = self.kv_from_tokens((latent, k_pe))
        return self.attend(q, k, v, mask)


# ---------------------------------------------------------------------------------------------
# feed-forward


class MLP(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def joined(self) -> torch.Tensor:
        """gate and up as one [2 * inner, hidden] product (the parameters are views of it)."""
        return joined(self, "gate_up", [self.gate_proj.weight, self.up_proj.weight], 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_silu_gated(F.linear(x, self.joined())))


def _silu_gated(h: torch.Tensor) -> torch.Tensor:
    """A joined gate/up product [..., 2 * inner] -> silu(gate) * up [..., inner]."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


class Gate(nn.Module):
    """Router; scores in float32 as the reference computes them."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.top_k, self.method, self.scoring = cfg.num_experts_per_tok, cfg.topk_method, cfg.scoring_func
        self.n_group, self.topk_group = cfg.n_group or 1, cfg.topk_group or 1
        self.norm, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if self.method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_routed_experts))

    def _group_mask(self, scores: torch.Tensor, group_scores: torch.Tensor) -> torch.Tensor:
        n = scores.shape[0]
        idx = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        mask = torch.zeros_like(group_scores).scatter_(1, idx, 1.0).bool()
        return mask[:, :, None].expand(n, self.n_group, scores.shape[1] // self.n_group).reshape(n, -1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(-1) if self.scoring == "softmax" else logits.sigmoid()
        if self.method == "greedy":
            weight, idx = scores.topk(self.top_k, dim=-1, sorted=False)
        elif self.method == "group_limited_greedy":
            groups = scores.view(scores.shape[0], self.n_group, -1).amax(-1)
            masked = scores.masked_fill(~self._group_mask(scores, groups), 0.0)
            weight, idx = masked.topk(self.top_k, dim=-1, sorted=False)
        else:  # noaux_tc: choose by biased scores, weigh by unbiased ones
            choice = scores + self.e_score_correction_bias.float()[None]
            groups = choice.view(scores.shape[0], self.n_group, -1).topk(2, dim=-1).values.sum(-1)
            masked = choice.masked_fill(~self._group_mask(scores, groups), 0.0)
            idx = masked.topk(self.top_k, dim=-1, sorted=False).indices
            weight = scores.gather(1, idx)
        if self.top_k > 1 and self.norm:
            weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)
        return idx, weight * self.scaling


class Experts(nn.Module):
    """Routed experts stacked as [E, out, in], so grouping tokens by expert is slicing.

    Two ways to run the grouped products, same results: `torch._grouped_mm` over expert offsets
    computed on the device (no host sync, so a CUDA step never waits on the CPU; used for bf16 on
    CUDA, where the kernel exists and is fast), and a loop of per-expert matmuls that reads the
    counts on the host. On CPU (float32, torch 2.13, measured 2026-12-01) grouped wins while each
    expert's share of a call is small, the loop once it is large: at the mini test shapes grouped is
    1.2-1.5x faster per call from 2 to 1,024 tokens (bitwise equal) and an engine run 7-11% faster
    (three A/Bs, medians of 8 alternating runs); at tiny's real shapes the two are equal for a decode step and
    the loop is 16% faster for a prompt. `_use_grouped` draws the line at about a million multiply-adds
    per expert and matrix.
    """

    grouped: bool | None = None  # None: choose per call (see `_use_grouped`); True/False forces one (tests)

    def __init__(self, num: int, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num, inner, hidden))
        self.up_proj = nn.Parameter(torch.empty(num, inner, hidden))
        self.down_proj = nn.Parameter(torch.empty(num, hidden, inner))

    def joined(self) -> torch.Tensor:
        """Each expert's gate and up as one product, [E, 2 * inner, hidden] (the parameters are views of it)."""
        return joined(self, "gate_up", [self.gate_proj, self.up_proj], 1)

    def _use_grouped(self, x: torch.Tensor, pairs: int) -> bool:
        if self.grouped is not None:
            return self.grouped
        if x.is_cuda:
            return x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
        num, inner, hidden = self.gate_proj.shape
        small = x.shape[0] >= 2 and pairs * inner * hidden < num * 2**20  # per expert: rows x inner x hidden
        return small and x.dtype == torch.float32 and _cpu_grouped_mm()

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [N,H], idx/weight [N,K] -> weighted sum [N,H] (float32 accumulation like the reference)."""
        n, k = idx.shape
        flat = idx.flatten()
        order = flat.argsort()
        tokens = x[order // k]
        gate_up = self.joined()
        if self._use_grouped(x, flat.numel()):
            # offs[e] = end row of expert e in the sorted tokens; searchsorted stays on the device
            # (bincount on CUDA reads the max back to the host)
            bounds = torch.arange(1, self.gate_proj.shape[0] + 1, device=x.device, dtype=flat.dtype)
            offs = torch.searchsorted(flat[order], bounds, out_int32=True)
            mm = torch._grouped_mm
            h = mm(tokens, gate_up.transpose(1, 2), offs=offs)
            out = mm(_silu_gated(h), self.down_proj.transpose(1, 2), offs=offs)
        else:
            counts = torch.bincount(flat, minlength=self.gate_proj.shape[0]).tolist()
            out = torch.empty_like(tokens)
            start = 0
            for e, c in enumerate(counts):
                if c:
                    h = tokens[start : start + c] @ gate_up[e].T
                    out[start : start + c] = _silu_gated(h) @ self.down_proj[e].T
                    start += c
        y = torch.empty_like(out)
        y[order] = out
        return (y.view(n, k, -1).float() * weight[..., None]).sum(1).to(x.dtype)


def _runs(probe) -> bool:
    """Whether `probe()` runs and returns true here: a private op may be missing or refuse a dtype."""
    try:
        return bool(probe())
    except (AttributeError, RuntimeError, NotImplementedError, TypeError):
        return False


@functools.cache
def _cpu_flash_lse() -> bool:
    """Whether this torch has the CPU flash-attention op that returns the log-sum-exp (2.13 does)."""
    x = torch.ones(1, 1, 2, 4)
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return op is not None and _runs(lambda: op(x, x, x, 0.0, True, scale=0.5)[1].shape == (1, 1, 2))


@functools.cache
def _cpu_grouped_mm() -> bool:
    """Whether this torch runs `torch._grouped_mm` on CPU in float32 (2.13 does; older ones may not)."""
    offs = torch.tensor([1, 3], dtype=torch.int32)
    return _runs(lambda: torch._grouped_mm(torch.ones(3, 4), torch.ones(2, 4, 4), offs=offs) is not None)


class MoE(nn.Module):
    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        idx, weight = self.gate(flat)
        y = self.experts(flat, idx, weight).view(shape)
        return y + self.shared_experts(x) if self.shared_experts is not None else y


# ---------------------------------------------------------------------------------------------
# decoder


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LanguageConfig, i: int):
        super().__init__()
        self.self_attn = MLAttention(cfg) if cfg.use_mla else MHAttention(cfg)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(i) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, positions, mask, cache, start):
        x = x + self.self_attn(self.input_layernorm(x), positions, mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """`language.model.*`"""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LanguageModel(nn.Module):
    """`language.*`: the decoder stack and an untied lm_head."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DecoderStack(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.caches: list[LayerCache] | None = None

    def setup_cache(self, batch: int, length: int) -> None:
        p = self.lm_head.weight
        self.caches = [layer.self_attn.new_cache(batch, length, p.device, p.dtype) for layer in self.model.layers]

    def clear_cache(self) -> None:
        self.caches = None

    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        key_valid: torch.Tensor,
        start: int = 0,
        last_only: bool = False,
    ) -> torch.Tensor:
        """embeds [B,q,H] at cache slots [start, start+q); key_valid [B, start+q] marks real tokens.

        Causality is in slot order (sequences are left-padded); a padded query may attend to itself
        only, which keeps its row finite without touching real tokens.
        """
        q_len = embeds.shape[1]
        kv_len = start + q_len
        q_slot = torch.arange(start, kv_len, device=embeds.device)[:, None]
        k_slot = torch.arange(kv_len, device=embeds.device)[None, :]
        mask = (k_slot <= q_slot)[None] & (key_valid[:, None, :] | (k_slot == q_slot)[None])
        mask = mask[:, None]  # [B,1,q,kv]
        x = embeds
        for i, layer in enumerate(self.model.layers):
            x = layer(x, positions, mask, self.caches[i] if self.caches is not None else None, start)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x)).float()
