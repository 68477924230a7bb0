"""What a workload must cost on a device, from the model's shapes: the roofline the engine is held to.

FLOPs count every multiply-add twice: the linear layers a token passes through (attention
projections, the dense MLP or the shared plus its top-k routed experts, the router, lm_head), attention
over its cached context (MHA: q.k and p.v per head; MLA absorbed: over the rank + rope latent), and for
images the ViT (linear layers and attention over 729 patches per tile) and the projector. Bytes: each
decoder step reads the dense weights and the routed experts its tokens touch (expected distinct
experts for the step's tokens under uniform routing), and each decoded token reads its sequence's
cached keys. The bound is max(FLOPs / matmul rate, bytes / copy bandwidth): a lower bound on the
wall time, so `bound / measured` is the fraction of the roofline reached.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class Shapes:
    vision_linear: int  # parameters in the ViT's linear layers (per patch token)
    vision_tokens: int  # patch tokens per tile
    vision_width: int
    vision_layers: int
    projector: int  # projector parameters (per merged token)
    merged_tokens: int  # tokens per tile after the 2x2 merge
    dense_per_token: int  # decoder parameters every token uses (attention, dense MLPs, shared experts, router, lm_head)
    expert_params: int  # parameters of one routed expert
    experts: int  # routed experts per MoE layer
    top_k: int
    moe_layers: int
    attn_flops_per_ctx: int  # FLOPs per token per cached position, all layers
    kv_bytes_per_token: int
    weight_bytes_dense: int
    dtype_bytes: int


def model_shapes(model) -> Shapes:
    lang = model.language
    cfg = model.cfg.language_config
    vcfg = model.cfg.vision_config
    size = model.dtype.itemsize if hasattr(model.dtype, "itemsize") else torch.empty(0, dtype=model.dtype).element_size()
    vision_linear = sum(m.weight.numel() for m in model.vision.modules() if isinstance(m, torch.nn.Linear))
    projector = sum(p.numel() for p in model.projector.parameters())
    dense = lang.lm_head.weight.numel()
    expert_params = experts = top_k = moe_layers = 0
    attn = kv = 0
    for layer in lang.model.layers:
        a = layer.self_attn
        dense += sum(p.numel() for p in a.parameters())
        mlp = layer.mlp
        if hasattr(mlp, "experts"):
            moe_layers += 1
            e = mlp.experts
            experts, top_k = e.gate_proj.shape[0], mlp.gate.top_k
            expert_params = (e.gate_proj.numel() + e.up_proj.numel() + e.down_proj.numel()) // experts
            dense += mlp.gate.weight.numel()
            if mlp.shared_experts is not None:
                dense += sum(p.numel() for p in mlp.shared_experts.parameters())
        else:
            dense += sum(p.numel() for p in mlp.parameters())
        if cfg.use_mla:
            attn += 2 * a.heads * (a.rank + a.rope) + 2 * a.heads * a.rank
        else:
            attn += 2 * 2 * a.heads * a.head_dim
        kv += sum(int(torch.Size(s).numel()) for s in a.entry_shapes()) * size
    grid = vcfg.grid
    merged = ((grid + 1) // 2) ** 2
    return Shapes(
        vision_linear=vision_linear, vision_tokens=grid * grid, vision_width=vcfg.width, vision_layers=vcfg.layers,
        projector=projector, merged_tokens=merged, dense_per_token=dense, expert_params=expert_params,
        experts=experts, top_k=top_k, moe_layers=moe_layers, attn_flops_per_ctx=attn, kv_bytes_per_token=kv,
        weight_bytes_dense=dense * size, dtype_bytes=size)


def workload_cost(s: Shapes, *, tiles: int, prompt_lens: list[int], new_tokens: list[int], steps: int,
                  tokens_per_step: float) -> dict:
    """FLOPs and bytes of a whole workload (all requests)."""
    vit = 2 * s.vision_linear * s.vision_tokens + 2 * 2 * s.vision_layers * s.vision_tokens**2 * s.vision_width
    vision = tiles * (vit + 2 * s.projector * s.merged_tokens)
    per_token = 2 * (s.dense_per_token + s.moe_layers * s.top_k * s.expert_params)
    tokens = sum(prompt_lens) + sum(new_tokens)
    # attention: token at position c attends to c + 1 positions (prefill and decode alike)
    ctx = sum(p * (p + 1) // 2 + n * p + n * (n - 1) // 2 for p, n in zip(prompt_lens, new_tokens))
    decoder = tokens * per_token + ctx * s.attn_flops_per_ctx
    # expected distinct routed experts a step's tokens touch, uniform routing
    touched = s.experts * (1 - (1 - s.top_k / max(s.experts, 1)) ** max(tokens_per_step, 1)) if s.experts else 0
    weight_bytes = steps * (s.weight_bytes_dense + s.moe_layers * touched * s.expert_params * s.dtype_bytes)
    kv_read = sum(n * p + n * (n - 1) // 2 for p, n in zip(prompt_lens, new_tokens)) * s.kv_bytes_per_token
    return {"vision_flops": vision, "decoder_flops": decoder, "flops": vision + decoder,
            "weight_bytes": weight_bytes, "kv_bytes": kv_read, "bytes": weight_bytes + kv_read}


def measure_device(device: torch.device, dtype: torch.dtype) -> dict:
    """This device's matmul rate (FLOP/s, square matmuls in `dtype`) and copy bandwidth (bytes/s read+written)."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    src = torch.empty(2**28 if cuda else 2**25, device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)

    def timed(fn, reps: int) -> float:
        fn()
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / reps

    mm = timed(lambda: a @ b, 20 if cuda else 5)
    cp = timed(lambda: dst.copy_(src), 20 if cuda else 5)
    return {"matmul_flops_per_s": 2 * n**3 / mm, "copy_bytes_per_s": 2 * src.numel() / cp}


def roofline(cost: dict, rates: dict) -> dict:
    t_compute = cost["flops"] / rates["matmul_flops_per_s"]
    t_memory = cost["bytes"] / rates["copy_bytes_per_s"]
    return {"compute_bound_s": t_compute, "memory_bound_s": t_memory, "bound_s": max(t_compute, t_memory),
            "bound": "compute" if t_compute >= t_memory else "memory"}
