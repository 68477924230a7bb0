"""Decode attention that reads the paged KV cache in place (a Triton kernel, flash-decoding style).

Without it a CUDA decode step gathers every sequence's blocks into a padded copy and runs SDPA over the
copy: the cache is read, written and read again, and every sequence is padded to its group's longest.
Decode is bound by those bytes (tiny page at 256 sequences: ~28 GB of keys and values per step), so
the kernel walks each sequence's block table itself and reads exactly its `length` tokens, once.

One program per (sequence, kv head, split of the sequence's tokens): it loads the query rows of the
heads that share that kv head (MHA: one; MLA, which attends as MQA over the latent: all of them, so a
latent row is read once for every head), runs an online softmax over its tokens in float32, and writes
a partial output and its log-sum-exp; `paged_decode` joins the splits. The number of splits depends only
on the shapes (batch, table width), never on the lengths, so a CUDA graph can hold the call.

MLA's key is the latent plus the shared rope key, kept as two cache entries: the kernel takes the rope
part as a second key (`q_rope`, `k_rope`) and the latent as the value too (`v=None`).

With TRITON_INTERPRET=1 (set before triton is imported) the same kernel runs on CPU tensors in Triton's
interpreter (numpy): that is how the tests hold it to SDPA (tests/conftest.py sets it); it is far too slow
for anything else, so the engine uses it on CUDA only.
"""
from __future__ import annotations

import functools
import math

import torch

try:  # Triton comes with CUDA builds of torch; without it the engine gathers and runs SDPA
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is missing
    triton = tl = None


def available() -> bool:
    return triton is not None


def _kernel(Q, QR, K, KR, V, Tables, Lengths, Out, Lse,
            s_qb, s_qh, s_qrb, s_qrh, s_kh, s_ks, s_krs, s_vh, s_vs, s_tb, s_ob, s_oh, s_os, s_lb, s_lh,
            scale, tokens_per_split,
            G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
            P: tl.constexpr, P_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
            HAS_ROPE: tl.constexpr, V_IS_K: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
            USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    # 64-bit offsets: a pool's head stride times a head index passes 2**31 on a large cache (tiny on an
    # H200 comes within 5% of it), and Triton types small integer arguments as 32-bit
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    length = tl.load(Lengths + b).to(tl.int32)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, length)

    g = tl.arange(0, G_PAD)
    heads = hk * G + g
    hmask = g < G
    d = tl.arange(0, D_PAD)
    q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=hmask[:, None] & (d[None, :] < D),
                other=0.0)
    if HAS_ROPE:
        r = tl.arange(0, P_PAD)
        qr = tl.load(QR + b * s_qrb + heads[:, None] * s_qrh + r[None, :],
                     mask=hmask[:, None] & (r[None, :] < P), other=0.0)
    dv = tl.arange(0, DV_PAD)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, DV_PAD], tl.float32)
    for t in range(start, end, BLOCK_N):
        offs = t + tl.arange(0, BLOCK_N)
        valid = offs < end
        page = tl.load(Tables + b * s_tb + offs // PAGE, mask=valid, other=0)
        slots = page.to(tl.int64) * PAGE + offs % PAGE
        k = tl.load(K + hk * s_kh + slots[:, None] * s_ks + d[None, :], mask=valid[:, None] & (d[None, :] < D),
                    other=0.0)
        if USE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        else:
            s = tl.sum(q[:, None, :].to(tl.float32) * k[None, :, :].to(tl.float32), axis=2)
        if HAS_ROPE:
            kr = tl.load(KR + slots[:, None] * s_krs + r[None, :], mask=valid[:, None] & (r[None, :] < P), other=0.0)
            if USE_DOT:
                s += tl.dot(qr, tl.trans(kr), input_precision=PRECISION)
            else:
                s += tl.sum(qr[:, None, :].to(tl.float32) * kr[None, :, :].to(tl.float32), axis=2)
        s = tl.where(valid[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if V_IS_K:
            v = k
        else:
            v = tl.load(V + hk * s_vh + slots[:, None] * s_vs + dv[None, :],
                        mask=valid[:, None] & (dv[None, :] < DV), other=0.0)
        if USE_DOT:
            pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        else:
            pv = tl.sum(p[:, :, None] * v[None, :, :].to(tl.float32), axis=1)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(Out + b * s_ob + heads[:, None] * s_oh + split * s_os + dv[None, :], out,
             mask=hmask[:, None] & (dv[None, :] < DV))
    tl.store(Lse + b * s_lb + heads * s_lh + split, lse, mask=hmask)


@functools.cache
def _compiled():
    return triton.jit(_kernel)


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1 when triton was imported)."""
    return triton is not None and bool(triton.knobs.runtime.interpret)


@functools.cache
def _programs_wanted(device_index: int) -> int:
    """Enough programs to fill the device twice over (splits are added until a step has them)."""
    return 2 * torch.cuda.get_device_properties(device_index).multi_processor_count


def _pow2(n: int, least: int = 1) -> int:
    return max(least, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def splits_for(batch: int, kv_heads: int, max_tokens: int, device: torch.device, block_n: int) -> int:
    """Splits of each sequence's tokens: from the shapes only (graph-safe). At least 256 tokens a split."""
    if device.type != "cuda":
        return max(1, min(math.ceil(max_tokens / 256), 4))
    want = math.ceil(_programs_wanted(device.index or 0) / max(batch * kv_heads, 1))
    return max(1, min(want, math.ceil(max_tokens / max(256, block_n))))


def launch_config(heads: int, kv_heads: int, dim: int, dv: int, rope: int, block_size: int,
                  dtype: torch.dtype, value_is_key: bool) -> tuple[dict, int]:
    """The kernel's compile-time constants and warps for a layout. Chosen so that nothing spills at the
    released shapes on sm_90 in bf16 (ptxas, triton 3.6: tiny MHA 168 registers, small / base MLA 156 / 190;
    64 tokens a tile spilled for MHA). Not tuned on a GPU yet: `bench/paged_decode_bench.py` measures it."""
    group = heads // kv_heads
    use_dot = group > 1  # tl.dot needs 16 rows; one query row per kv head reduces on the vector units
    block_n = min(32, block_size)
    while block_size % block_n:
        block_n //= 2
    if use_dot:
        block_n = max(block_n, 16)
    const = dict(G=group, G_PAD=_pow2(group, 16 if use_dot else 1), D=dim, D_PAD=_pow2(dim, 16),
                 P=max(rope, 1), P_PAD=_pow2(rope, 16), DV=dv, DV_PAD=_pow2(dv, 16), HAS_ROPE=rope > 0,
                 V_IS_K=value_is_key, PAGE=block_size, BLOCK_N=block_n, USE_DOT=use_dot,
                 # float32 products in full precision (Triton's default for them is tf32); bf16 ones are unaffected
                 PRECISION="ieee" if dtype == torch.float32 else "tf32")
    return const, 8 if use_dot and dim > 128 else 4


def paged_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, tables: torch.Tensor,
                 lengths: torch.Tensor, block_size: int, scale: float, *, q_rope: torch.Tensor | None = None,
                 k_rope: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence against its cached tokens, read through its block table.

    q [B, H, D]; k [kv_heads, slots, D] (the pool, head-major); v like k, or None: the value is k itself
    (MLA's latent); q_rope [B, H, P] and k_rope [slots, P]: a second key part, shared by all kv heads
    (MLA's rope key); tables [B, W] block ids; lengths [B] tokens to read (>= 1). Returns [B, H, DV]
    in q's dtype: softmax(scale * (q.k + q_rope.k_rope)) over each sequence's first `lengths` tokens, times v.
    Heads h * G .. h * G + G - 1 use kv head h (G = H / kv_heads), as `repeat_interleave` pairs them."""
    if triton is None:
        raise RuntimeError("paged_decode needs triton")
    bsz, heads, dim = q.shape
    kv_heads = k.shape[0]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not group over {kv_heads} kv heads")
    dv = dim if v is None else v.shape[-1]
    has_rope = q_rope is not None
    if has_rope and (k_rope is None or k_rope.shape[-1] != q_rope.shape[-1]):
        raise ValueError("q_rope needs a k_rope of its width")
    q = q.contiguous()
    if has_rope:
        q_rope = q_rope.contiguous()
    if tables.stride(1) != 1:
        tables = tables.contiguous()
    width = tables.shape[1] * block_size
    const, warps = launch_config(heads, kv_heads, dim, dv, q_rope.shape[-1] if has_rope else 0, block_size, q.dtype,
                                 v is None)
    block_n = const["BLOCK_N"]
    splits = splits_for(bsz, kv_heads, width, q.device, block_n)
    per_split = math.ceil(math.ceil(width / splits) / block_n) * block_n
    out = torch.empty(bsz, heads, splits, dv, device=q.device, dtype=torch.float32)
    lse = torch.empty(bsz, heads, splits, device=q.device, dtype=torch.float32)
    kr = k_rope if has_rope else k
    qr = q_rope if has_rope else q
    vv = k if v is None else v
    interpret = interpreted()
    if q.device.type != "cuda" and not interpret:
        raise RuntimeError(f"paged_decode runs on CUDA, or on {q.device.type} tensors in Triton's interpreter "
                           "(TRITON_INTERPRET=1 before triton is imported)")
    _compiled()[(bsz, kv_heads, splits)](
        q, qr, k, kr, vv, tables, lengths, out, lse,
        q.stride(0), q.stride(1), qr.stride(0), qr.stride(1), k.stride(0), k.stride(1), kr.stride(-2),
        vv.stride(0), vv.stride(1), tables.stride(0), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), float(scale), per_split, **const,
        **({} if interpret else {"num_warps": warps}),
    )
    if splits == 1:
        return out[:, :, 0].to(q.dtype)
    weight = torch.softmax(lse, dim=-1)  # each split's share of the sequence's exp-sum (empty splits: 0)
    return (out * weight[..., None]).sum(2).to(q.dtype)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, tables: torch.Tensor, lengths: torch.Tensor,
              block_size: int, scale: float, *, q_rope: torch.Tensor | None = None,
              k_rope: torch.Tensor | None = None) -> torch.Tensor:
    """`paged_decode` by gathering and plain softmax, one sequence at a time (the tests' oracle)."""
    outs = []
    group = q.shape[1] // k.shape[0]
    for i in range(q.shape[0]):
        n = int(lengths[i])
        slots = (tables[i, :, None] * block_size + torch.arange(block_size, device=tables.device)).flatten()[:n]
        kk = k[:, slots].float().repeat_interleave(group, 0)  # [H, n, D]
        s = torch.einsum("hd,hnd->hn", q[i].float(), kk)
        if q_rope is not None:
            s = s + q_rope[i].float() @ k_rope[slots].float().T
        vv = (k if v is None else v)[:, slots].float().repeat_interleave(group, 0)
        outs.append(torch.einsum("hn,hnd->hd", (s * scale).softmax(-1), vv))
    return torch.stack(outs).to(q.dtype)
