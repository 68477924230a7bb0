"""Generation benchmark: the engine against plain `model.generate`, with the roofline it is held to.

    python -m model.bench --checkpoint DIR --workload {page,catalog} --device {cpu,cuda} --requests N

Workloads (synthetic images, random-weight checkpoints of any size, e.g. `model.smoke --size full`):
  page     one 768x1152 page (2x3 tiles + global view, ~1,450 prompt tokens), exactly 700 new tokens each
  catalog  one 1024x768 photo, exactly 150 new tokens each
EOS is ignored so every request generates exactly its tokens. Variants, in one run:
  engine        all requests through one `Engine` (continuous batching)
  static_batch  `model.generate` on static batches of --batch-size (the pre-engine model stage)
  baseline      `model.generate` one request at a time (--baseline-requests of them)
Prints a line per variant, then one JSON line (the last line) with the engine's figures
(`items_per_s`, `prefill_tokens_per_s`, `decode_tokens_per_s`, `vision_tiles_per_s`, `roofline_fraction`, ...),
`baseline_items_per_s`, `speedup` (engine / baseline, of the median walls), `speedup_per_repeat` and the other
variants' figures.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import Engine, SamplingParams, load_pretrained
from .roofline import measure_device, model_shapes, roofline, workload_cost

PROMPTS = {
    "page": "<image>\n<|grounding|>Convert the document to markdown.",
    "catalog": "<image>\n<|grounding|>Describe the items in this photo and read any label text.",
}
NEW_TOKENS = {"page": 700, "catalog": 150}
SIZES = {"page": (768, 1152), "catalog": (1024, 768)}


def synthetic_image(workload: str, i: int) -> Image.Image:
    """A page of text lines (portrait 768x1152) or a cluttered shelf photo (landscape 1024x768)."""
    rng = np.random.default_rng(i)
    w, h = SIZES[workload]
    if workload == "page":
        img = Image.new("RGB", (w, h), "white")
        d = ImageDraw.Draw(img)
        for y in range(50, h - 50, 24):
            d.text((50, y), " ".join("lorem%d" % rng.integers(1000) for _ in range(8)), fill="black")
        return img
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = int(rng.integers(0, w - 200)), int(rng.integers(0, h - 160))
        d.rectangle([x, y, x + 180, y + 140], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        d.text((x + 10, y + 10), "SKU-%05d" % rng.integers(99999), fill="white")
    return img


def synthetic_requests(processor, workload: str, n: int, images_per_request: int = 1) -> list:
    """`n` prepared requests of `workload`, each with its own synthetic image(s)."""
    k_img = images_per_request
    content = PROMPTS[workload] if k_img == 1 else (
        "".join(f"Image {k + 1}: <image>\n" for k in range(k_img)) + PROMPTS[workload].split("\n", 1)[1])
    conv = [{"role": "<|User|>", "content": content}, {"role": "<|Assistant|>", "content": ""}]
    return [processor.prepare(conv, [synthetic_image(workload, i * k_img + k) for k in range(k_img)])
            for i in range(n)]


def peak_memory_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (peak RSS)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(device: str, fn):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def run_static(model, processor, prepared, batch: int, new_tokens: int, device: str) -> float:
    """Wall seconds of `model.generate` over `prepared` in static batches of `batch`, EOS ignored."""
    def go():
        for s in range(0, len(prepared), batch):
            out = model.generate(processor.collate(prepared[s : s + batch]).to(device), max_new_tokens=new_tokens,
                                 eos_token_id=-1)
            assert out.shape[1] == new_tokens
    return _timed(device, go)[1]


def main(argv: list[str] | None = None, loaded: tuple | None = None) -> dict:
    """`loaded`: a (model, processor) already on the device (one load serves several runs of a GPU script)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=loaded is None, help="local dir, s3:// URL or hub id (with `loaded`: "
                    "its label)")
    ap.add_argument("--workload", choices=sorted(PROMPTS), default="page")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                    help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: 700 (page) or 150 (catalog)")
    ap.add_argument("--images-per-request", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=4, help="static_batch variant's batch size")
    ap.add_argument("--baseline-requests", type=int, default=None,
                    help="requests for the one-at-a-time baseline (default: all on cpu, 2 on cuda)")
    ap.add_argument("--skip-static", action="store_true", help="do not run the static_batch variant")
    ap.add_argument("--skip-baseline", action="store_true",
                    help="do not run the one-at-a-time baseline (A/B runs whose ratio another run gives)")
    ap.add_argument("--max-seqs", type=int, default=None)
    ap.add_argument("--kv-cache-tokens", type=int, default=None)
    ap.add_argument("--max-step-tokens", type=int, default=None)
    ap.add_argument("--in-place-decode", choices=["auto", "on", "off"], default="auto",
                    help="decode attention reads the cache in place (strided runs) or gathers blocks; auto: "
                         "in place on CPU")
    ap.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                    help="decode-only steps replayed as CUDA graphs at bucketed shapes; auto: on for cuda")
    ap.add_argument("--paged-attention", choices=["auto", "on", "off"], default="auto",
                    help="decode attention through the paged kernel (reads the blocks in place); auto: on for cuda "
                         "where triton is present and the kernel passes the engine's check")
    ap.add_argument("--compiled-decode", choices=["auto", "on", "off"], default="auto",
                    help="CPU decode-only steps as one torch.compile'd function (model/compiled_decode.py); auto: on "
                         "for CPU where it covers the model and PAGEMILL_COMPILED_DECODE is not 0")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each variant, alternating; the median wall time is reported (noisy machines)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    new_tokens = args.max_new_tokens or NEW_TOKENS[args.workload]
    torch.manual_seed(0)

    if loaded is not None:
        (model, processor), load_s = loaded, 0.0
    else:
        (model, processor), load_s = _timed(args.device, lambda: load_pretrained(
            args.checkpoint, device=args.device, dtype=dtype))
    load_mem = peak_memory_gb(args.device)
    print(f"loaded {args.checkpoint} on {args.device} {dtype} in {load_s:.1f}s", flush=True)

    n_img = args.images_per_request
    prepared = synthetic_requests(processor, args.workload, args.requests, n_img)
    prompt_lens = [len(p) for p in prepared]
    tiles = sum(int(sum(1 + w * h for w, h in p.images_spatial_crop.tolist() if w and h)) for p in prepared)
    limits = {k: v for k, v in dict(max_seqs=args.max_seqs, kv_cache_tokens=args.kv_cache_tokens,
                                    max_step_tokens=args.max_step_tokens).items() if v}
    if args.in_place_decode != "auto":
        limits["in_place_decode"] = args.in_place_decode == "on"
    if args.cuda_graphs != "auto":
        limits["cuda_graphs"] = args.cuda_graphs == "on"
    if args.paged_attention != "auto":
        limits["paged_attention"] = args.paged_attention == "on"
    if args.compiled_decode != "auto":
        limits["compiled_decode"] = args.compiled_decode == "on"
    engine = Engine(model, processor, **limits)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    # warm-up, not timed: eight requests, so that decode-only steps of 8 sequences (the compiled CPU step's
    # first compile, Engine.COMPILE_AT; the CUDA graphs' first captures) happen here
    engine.generate(prepared[:8], SamplingParams(max_new_tokens=16, ignore_eos=True))
    model.generate(processor.collate(prepared[:1]).to(args.device), max_new_tokens=2)
    engine.stats.clear()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    walls = {"engine": [], "static": [], "baseline": []}
    n_base = args.baseline_requests or (len(prepared) if args.device == "cpu" else min(2, len(prepared)))
    for rep in range(args.repeats):  # alternate the variants so a slow phase of the machine hits all of them
        if rep:
            engine.stats.clear()
        results, w = _timed(args.device, lambda: engine.generate(prepared, params))
        walls["engine"].append(w)
        if not args.skip_static:
            walls["static"].append(run_static(model, processor, prepared, args.batch_size, new_tokens, args.device))
        if not args.skip_baseline:
            walls["baseline"].append(run_static(model, processor, prepared[:n_base], 1, new_tokens, args.device))
    wall = statistics.median(walls["engine"])
    assert all(r.finish_reason == "length" and len(r.tokens) == new_tokens for r in results), \
        [(r.finish_reason, r.error) for r in results if r.finish_reason != "length"][:3]
    steps = engine.stats["steps"]
    gen_tokens = sum(len(r.tokens) for r in results)
    peak = peak_memory_gb(args.device)
    rates = measure_device(torch.device(args.device), dtype)
    cost = workload_cost(model_shapes(model), tiles=tiles, prompt_lens=prompt_lens,
                         new_tokens=[new_tokens] * len(prepared), steps=steps,
                         tokens_per_step=(sum(prompt_lens) + gen_tokens) / max(steps, 1))
    roof = roofline(cost, rates)
    items_per_s = len(prepared) / wall
    print(f"engine: {items_per_s:.3f} items/s, {steps} steps, {wall:.2f}s", flush=True)

    static_s = statistics.median(walls["static"]) if walls["static"] else None
    if static_s:
        print(f"static_batch (batch {args.batch_size}): {len(prepared) / static_s:.3f} items/s", flush=True)
    baseline = n_base / statistics.median(walls["baseline"]) if walls["baseline"] else None
    if baseline:
        print(f"baseline (one at a time): {baseline:.3f} items/s", flush=True)

    result = {
        "checkpoint": str(args.checkpoint),
        "workload": args.workload,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "requests": len(prepared),
        "images_per_request": n_img,
        "new_tokens_per_request": new_tokens,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "walls_s": {k: [round(x, 3) for x in v] for k, v in walls.items()},
        "load_s": round(load_s, 2),
        "load_peak_gb": round(load_mem, 3),
        "peak_gb": round(peak, 3),
        "in_place_decode": engine.in_place_decode,
        "paged_attention": {"on": engine.paged_attention, "fallback": engine.paged_fallback},
        "compiled_decode": {"on": engine.compiled is not None, "fallback": engine.compiled_fallback,
                            "steps": engine.stats["compiled_decode_steps"]},
        "cuda_graphs": {"on": bool(engine.static and engine.static.use_graphs),
                        "fallback": engine.static.fallback if engine.static else None,
                        **{k: engine.stats[k] for k in ("static_decode_steps", "static_decode_in_place_steps",
                                                        "cuda_graph_captures", "cuda_graph_capture_ms",
                                                        "cuda_graph_replays", "cuda_graph_fallbacks")}},
        "engine_plan": {"kv_cache_tokens": engine.plan.tokens, "max_seqs": engine.plan.max_seqs,
                        "max_step_tokens": engine.plan.max_step_tokens, "block_size": engine.plan.block_size},
        "wall_s": round(wall, 3),
        "steps": steps,
        "prompt_tokens": sum(prompt_lens),
        "generated_tokens": gen_tokens,
        "vision_tiles": tiles,
        "items_per_s": round(items_per_s, 4),
        "requests_per_s": round(items_per_s, 4),
        "prefill_tokens_per_s": round(sum(prompt_lens) / wall, 1),
        "decode_tokens_per_s": round(gen_tokens / wall, 1),
        "generated_tokens_per_s": round(gen_tokens / wall, 1),
        "vision_tiles_per_s": round(tiles / wall, 2),
        "device_rates": {k: float(f"{v:.4g}") for k, v in rates.items()},
        "cost": {k: float(f"{v:.4g}") for k, v in cost.items()},
        "roofline": {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in roof.items()},
        "roofline_fraction": round(roof["bound_s"] / wall, 4),
        "roofline_items_per_s": round(len(prepared) / roof["bound_s"], 3),
        "static_batch_items_per_s": round(len(prepared) / static_s, 4) if static_s else None,
        "speedup_vs_static_batch": round(static_s / wall, 2) if static_s else None,
        "baseline_requests": n_base,
        "baseline_items_per_s": round(baseline, 4) if baseline else None,
        "speedup": round(items_per_s / baseline, 2) if baseline else None,
        # per alternating repeat (engine and baseline seconds apart): steadier than the ratio of medians on a
        # machine whose speed drifts over minutes
        "speedup_per_repeat": [round((len(prepared) / e) / (n_base / b), 2)
                               for e, b in zip(walls["engine"], walls["baseline"])],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
