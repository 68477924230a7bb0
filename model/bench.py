"""Model benchmark: load time, peak memory and generation throughput on a synthetic workload.

    python -m model.bench --checkpoint DIR --workload {page,catalog} --device {cpu,cuda} --requests N

Prints progress lines, then one JSON line with the figures (the last line). The bf16-on-GPU
acceptance check (real-size tiny plus the reference fixtures) is `bench/gpu_check.py`, which calls this.
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import load_pretrained

PROMPTS = {
    "page": "<image>\n<|grounding|>Convert the document to markdown.",
    "catalog": "<image>\n<|grounding|>Describe the items in this photo and read any label text.",
}


def synthetic_image(workload: str, i: int) -> Image.Image:
    """A page of text lines (portrait, ~1288 px) or a cluttered shelf photo (landscape)."""
    rng = np.random.default_rng(i)
    if workload == "page":
        img = Image.new("RGB", (996, 1288), "white")
        d = ImageDraw.Draw(img)
        for y in range(60, 1230, 28):
            d.text((70, y), " ".join("lorem%d" % rng.integers(1000) for _ in range(9)), fill="black")
        return img
    img = Image.fromarray(rng.integers(0, 255, (768, 1024, 3), dtype=np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = int(rng.integers(0, 800)), int(rng.integers(0, 600))
        d.rectangle([x, y, x + 180, y + 140], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        d.text((x + 10, y + 10), "SKU-%05d" % rng.integers(99999), fill="white")
    return img


def peak_memory_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (peak RSS)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="local dir, s3:// URL or hub id")
    ap.add_argument("--workload", choices=sorted(PROMPTS), default="page")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                    help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--images-per-request", type=int, default=1)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    torch.manual_seed(0)

    t0 = time.perf_counter()
    model, processor = load_pretrained(args.checkpoint, device=args.device, dtype=dtype)
    sync(args.device)
    load_s = time.perf_counter() - t0
    load_mem = peak_memory_gb(args.device)
    print(f"loaded {args.checkpoint} on {args.device} {dtype} in {load_s:.1f}s", flush=True)

    n_img = args.images_per_request
    content = PROMPTS[args.workload] if n_img == 1 else (
        "".join(f"Image {k + 1}: <image>\n" for k in range(n_img)) + PROMPTS[args.workload].split("\n", 1)[1])
    conv = [{"role": "<|User|>", "content": content}, {"role": "<|Assistant|>", "content": ""}]
    prepared = [processor.prepare(conv, [synthetic_image(args.workload, i * n_img + k) for k in range(n_img)])
                for i in range(args.requests)]
    # warm-up (allocator, kernels) on one small batch, not timed
    model.generate(processor.collate(prepared[:1]).to(args.device), max_new_tokens=2)
    sync(args.device)

    prompt_tokens = gen_tokens = 0
    t0 = time.perf_counter()
    for s in range(0, len(prepared), args.batch_size):
        batch = processor.collate(prepared[s : s + args.batch_size]).to(args.device)
        out = model.generate(batch, max_new_tokens=args.max_new_tokens, eos_token_id=-1)
        prompt_tokens += int(batch.attention_mask.sum())
        gen_tokens += out.numel()
    sync(args.device)
    wall = time.perf_counter() - t0
    result = {
        "checkpoint": str(args.checkpoint),
        "workload": args.workload,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "requests": args.requests,
        "batch_size": args.batch_size,
        "images_per_request": n_img,
        "load_s": round(load_s, 2),
        "load_peak_gb": round(load_mem, 3),
        "peak_gb": round(peak_memory_gb(args.device), 3),
        "wall_s": round(wall, 3),
        "requests_per_s": round(args.requests / wall, 3),
        "prompt_tokens": prompt_tokens,
        "generated_tokens": gen_tokens,
        "generated_tokens_per_s": round(gen_tokens / wall, 2),
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
