"""The engine issue's GPU run, in one call, most telling part first, within a deadline.

    python3 bench/h200.py --device cuda --fixtures .fixtures/tiny_mha-seed1 .fixtures/small_mla-seed1 \
        --json $OUT/h200.json --deadline-s 480 [--parts NAME ...]

Real-size models are built in memory on the device (`model.smoke.random_pretrained`: the official keys and
shapes, random weights; nothing written or read), each variant once, shared by the parts that use it.
Parts (default order):
  paged_decode        one layer's decode attention, the paged kernel against gather + SDPA (bench/paged_decode_bench)
  tiny_page           model.bench page, 256 requests, default engine (CUDA graphs + paged kernel), baseline of 1
  tiny_catalog        model.bench catalog, 512 requests, baseline of 1
  bf16_fixtures       per fixture case: bf16 greedy tokens (generate and engine) against the float32 reference
  small_page          small (MLA) page, 256 requests, baseline of 1
  base_page           base page, 128 requests, no baseline
  tiny_page_gathered  A/B: decode attention gathering blocks + SDPA (no paged kernel)
  tiny_page_no_graphs A/B: every step eager
  moe_fold            shared experts folded into the grouped product against their own MLP (bench/moe_fold)
  profile_page, profile_catalog   torch.profiler tables of the engine's prefill phase and 20 decode steps
A part starts only if the time so far plus its estimate fits `--deadline-s`; the JSON (`--json`) is rewritten
after every part, so a time-out keeps what was measured. `--size mini` rehearses all of it on CPU.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from model import bench as model_bench  # noqa: E402
from model.smoke import random_pretrained  # noqa: E402

import gpu_check  # noqa: E402
import gpu_engine  # noqa: E402
import moe_fold  # noqa: E402
import paged_decode_bench  # noqa: E402

# seconds each part is expected to take on the H200 (a part is skipped when it would pass the deadline)
ESTIMATE_S = {"paged_decode": 40, "tiny_page": 100, "tiny_catalog": 45, "bf16_fixtures": 40, "small_page": 120,
              "base_page": 90, "tiny_page_gathered": 50, "tiny_page_no_graphs": 60, "moe_fold": 30,
              "profile_page": 30, "profile_catalog": 25}


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class Models:
    """One variant on the device at a time: asking for another drops the one held."""

    def __init__(self, device: str, dtype: torch.dtype, size: str) -> None:
        self.device, self.dtype, self.size, self.name, self.loaded, self.build_s = device, dtype, size, None, None, {}

    def get(self, variant: str) -> tuple:
        if self.name != variant:
            self.loaded = self.name = None
            free(self.device)
            t0 = time.perf_counter()
            self.loaded = random_pretrained(variant, self.size, device=self.device, dtype=self.dtype)
            model_bench.sync(self.device)
            self.build_s[variant] = round(time.perf_counter() - t0, 2)
            self.name = variant
        return self.loaded


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=["mini", "full"], default="full", help="mini: a quick rehearsal on CPU")
    ap.add_argument("--fixtures", type=Path, nargs="*", default=[])
    ap.add_argument("--parts", nargs="*", default=list(ESTIMATE_S), choices=list(ESTIMATE_S))
    ap.add_argument("--deadline-s", type=float, default=480.0)
    ap.add_argument("--page-requests", type=int, default=256)
    ap.add_argument("--catalog-requests", type=int, default=512)
    ap.add_argument("--base-requests", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="override the workloads' 700/150 (rehearsal)")
    ap.add_argument("--profile-requests", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda or args.size == "full" else torch.float32
    result: dict = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": args.device,
                    "device_name": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                    "dtype": str(dtype).split(".")[1], "elapsed_s": {}, "skipped": []}
    models = Models(args.device, dtype, args.size)
    extra = ["--max-new-tokens", str(args.max_new_tokens)] if args.max_new_tokens else []

    def bench(variant: str, workload: str, n: int, *flags: str) -> dict:
        return model_bench.main(["--checkpoint", f"random:{variant}-{args.size}", "--device", args.device,
                                 "--dtype", result["dtype"], "--workload", workload, "--requests", str(n), "--baseline-requests", "1", "--skip-static", *flags, *extra],
                                loaded=models.get(variant))

    def fixtures() -> dict:
        out = {}
        for f in args.fixtures:
            out[f.name] = {"generate": gpu_check.fixture_agreement(f, args.device),
                           "engine": gpu_engine.engine_vs_generate(f, args.device, dtype)}
        agree = [row["bfloat16_agree"] for f in out.values() for row in f["generate"].values()]
        out["bf16_cases_agreeing_8"] = f"{sum(a >= 8 for a in agree)}/{len(agree)}"
        return out

    def profile(workload: str) -> dict:
        return gpu_engine.profile_steps(None, args.device, dtype, workload, args.profile_requests,
                                        loaded=models.get("tiny"))

    small = ["--batch", "2", "4", "--repeats", "2"] if args.size == "mini" else []
    parts = {
        "paged_decode": lambda: paged_decode_bench.main(["--device", args.device, "--size", args.size, *small]),
        "tiny_page": lambda: bench("tiny", "page", args.page_requests),
        "tiny_catalog": lambda: bench("tiny", "catalog", args.catalog_requests),
        "bf16_fixtures": fixtures,
        "small_page": lambda: bench("small", "page", args.page_requests),
        "base_page": lambda: bench("base", "page", args.base_requests, "--skip-baseline"),
        "tiny_page_gathered": lambda: bench("tiny", "page", args.page_requests, "--paged-attention", "off",
                                            "--skip-baseline"),
        "tiny_page_no_graphs": lambda: bench("tiny", "page", args.page_requests, "--cuda-graphs", "off",
                                             "--skip-baseline"),
        "moe_fold": lambda: moe_fold.main(["--device", args.device, "--size", args.size]),
        "profile_page": lambda: profile("page"),
        "profile_catalog": lambda: profile("catalog"),
    }
    for name in args.parts:
        elapsed = time.perf_counter() - t_start
        if elapsed + ESTIMATE_S[name] > args.deadline_s:
            result["skipped"].append(name)
            print(f"{name}: skipped at {elapsed:.0f}s (deadline {args.deadline_s:.0f}s)", flush=True)
            continue
        print(f"{name} ... ({elapsed:.0f}s)", flush=True)
        t0 = time.perf_counter()
        try:
            result[name] = parts[name]()
        except Exception as e:  # noqa: BLE001 - record and go on: one failing part must not lose the others
            result[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            print(result[name]["traceback"], flush=True)
        result["elapsed_s"][name] = round(time.perf_counter() - t0, 1)
        result["build_s"] = models.build_s
        free(args.device)
        if args.json:  # after every part, so a time-out still leaves the figures so far
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1) + "\n")
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(summary(result)), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


def summary(result: dict) -> dict:
    """The figures the issue's targets name, one line (the device tool returns the output's tail)."""
    out = {"total_s": result.get("total_s"), "skipped": result["skipped"], "elapsed_s": result["elapsed_s"]}
    for name, r in result.items():
        if not isinstance(r, dict):
            continue
        if "error" in r:
            out[name] = r["error"][:300]
        elif "items_per_s" in r:
            out[name] = {k: r.get(k) for k in ("items_per_s", "baseline_items_per_s", "speedup", "roofline_fraction",
                                               "roofline_items_per_s", "decode_tokens_per_s", "peak_gb", "steps")}
            out[name]["graphs"] = {k: r["cuda_graphs"].get(k) for k in ("on", "fallback", "cuda_graph_replays")}
            out[name]["paged"] = r["paged_attention"]
        elif name == "bf16_fixtures":
            out[name] = r.get("bf16_cases_agreeing_8")
    return out


if __name__ == "__main__":
    main()
