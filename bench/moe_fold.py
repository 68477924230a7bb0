"""Shared experts as their own MLP (what `model.language.MoE` does) against folded into the routed grouped
product (each token also routed to the shared experts' slices, weight 1): one MoE layer at a variant's real
shapes, timed on the device, before the fold is built into `model/`.

    python bench/moe_fold.py --device cuda --variants tiny small base --tokens 256 4096

The fold is exact in real arithmetic: the shared MLP of inner size S * I is the sum of S MLPs of inner I
(its gate/up rows and down columns split in S), so it can ride the routed product as S more experts. What it
may save is the shared MLP's own kernels (two products, the gating, the add); what it costs is S more rows
per token through the sort, the gather and the weighted sum, and a copy of the shared weights in the stacked
tensor. On CPU (2026-12-03, float32, 2 cores) the fold was no faster at tiny's shapes (16 / 256 / 1,457
tokens: 114 / 263 / 904 ms against 120 / 254 / 936 ms) and slower at the mini test shapes for a prompt
(1,457 tokens: 10.9 against 8.0 ms), so `model/` keeps the shared MLP; this script decides it on a GPU.
Prints one JSON line: per variant and token count, median ms of each (eager and, on CUDA, replayed as a
CUDA graph) and the largest difference between the two outputs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import LanguageConfig  # noqa: E402
from model.language import MoE, Experts  # noqa: E402
from model.presets import make_config  # noqa: E402


def folded(moe: MoE) -> Experts:
    """The routed experts with the shared MLP's S slices appended as experts E .. E + S - 1 (a copy)."""
    r, sh = moe.experts, moe.shared_experts
    num, inner, hidden = r.gate_proj.shape
    s = sh.gate_proj.weight.shape[0] // inner
    f = Experts(num + s, hidden, inner).to(r.gate_proj.device, r.gate_proj.dtype)
    with torch.no_grad():
        f.gate_proj.copy_(torch.cat([r.gate_proj, sh.gate_proj.weight.view(s, inner, hidden)]))
        f.up_proj.copy_(torch.cat([r.up_proj, sh.up_proj.weight.view(s, inner, hidden)]))
        f.down_proj.copy_(torch.cat([r.down_proj, sh.down_proj.weight.view(hidden, s, inner).transpose(0, 1)]))
    return f


def fold_forward(moe: MoE, experts: Experts, x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    num = moe.experts.gate_proj.shape[0]
    s = experts.gate_proj.shape[0] - num
    idx, weight = moe.gate(x)
    idx = torch.cat([idx, torch.arange(num, num + s, device=x.device).expand(n, s)], 1)
    weight = torch.cat([weight, weight.new_ones(n, s)], 1)
    return experts(x, idx, weight)


def _time(fn, device: str, repeats: int) -> float:
    """Median ms of `fn()`; on CUDA by events around each call."""
    fn()
    ts = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def _graphed(fn, x: torch.Tensor):
    """`fn(x)` captured once as a CUDA graph; the returned callable replays it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(x)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(x)
    return g.replay


def measure(variant: str, size: str, tokens: list[int], device: str, dtype: torch.dtype, repeats: int) -> dict:
    cfg = LanguageConfig.model_validate(make_config(variant, size)["language_config"])
    torch.manual_seed(0)
    moe = MoE(cfg).to(device, dtype)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.02)
    experts = folded(moe)
    out = {"hidden": cfg.hidden_size, "inner": cfg.moe_intermediate_size, "experts": cfg.n_routed_experts,
           "top_k": cfg.num_experts_per_tok, "shared": cfg.n_shared_experts}
    with torch.inference_mode():
        for n in tokens:
            x = torch.randn(n, cfg.hidden_size, device=device, dtype=dtype)
            today, fold = (lambda: moe(x)), (lambda: fold_forward(moe, experts, x))
            ref = moe(x).float()
            row = {"max_abs_diff": float((fold().float() - ref).abs().max()),
                   "ref_max_abs": float(ref.abs().max()),
                   "today_ms": round(_time(today, device, repeats), 4),
                   "folded_ms": round(_time(fold, device, repeats), 4)}
            if device.startswith("cuda"):
                for name, fn in (("today", lambda y: moe(y)), ("folded", lambda y: fold_forward(moe, experts, y))):
                    try:
                        row[f"{name}_graph_ms"] = round(_time(_graphed(fn, x), device, repeats), 4)
                    except Exception as e:  # noqa: BLE001 - a capture failure is a finding, not a crash
                        row[f"{name}_graph_error"] = f"{type(e).__name__}: {e}"[:300]
            out[str(n)] = row
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=["mini", "full"], default="full")
    ap.add_argument("--variants", nargs="*", default=["tiny", "small", "base"])
    ap.add_argument("--tokens", type=int, nargs="*", default=[256, 4096], help="tokens per call (decode, prefill)")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    result = {"device": args.device, "dtype": str(dtype).split(".")[1], "torch": torch.__version__, "size": args.size}
    for v in args.variants:
        result[v] = measure(v, args.size, args.tokens, args.device, dtype, args.repeats)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
