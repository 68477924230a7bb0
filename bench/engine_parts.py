"""Where a catalog item's time goes, engine against `model.generate` one at a time (CPU or GPU).

    python bench/engine_parts.py --checkpoint <mini tiny> --requests 16 --repeats 3

Runs, alternating, in one process: the engine over all requests with 1 and with N new tokens, `model.generate`
one request at a time with 1 and N, and the prompts' embedding (vision tower + projector) one request at a
time. Prints the minimum of each per item, and from them prefill (1 token, less vision) and decode (N less 1)
for both paths: the split the CPU 3x target turns on (docs/performance.md, eleventh session).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import Engine, SamplingParams, load_pretrained  # noqa: E402
from model.bench import synthetic_requests  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    model, processor = load_pretrained(args.checkpoint, device=args.device)
    preps = synthetic_requests(processor, "catalog", args.requests)
    engine = Engine(model, processor)
    # warm-up: eight requests, so that a decode-only step of 8 (the compiled CPU step's Engine.COMPILE_AT) compiles here
    engine.generate(preps[:8], SamplingParams(max_new_tokens=16, ignore_eos=True))
    batches = [processor.collate([p]).to(args.device) for p in preps]
    n = args.new_tokens

    def timed(fn) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    def vision():
        with torch.inference_mode():
            for b in batches:
                model.embed(b)

    runs = {
        "engine_1": lambda: engine.generate(preps, SamplingParams(max_new_tokens=1, ignore_eos=True)),
        "engine_n": lambda: engine.generate(preps, SamplingParams(max_new_tokens=n, ignore_eos=True)),
        "alone_1": lambda: [model.generate(b, max_new_tokens=1, eos_token_id=-1) for b in batches],
        "alone_n": lambda: [model.generate(b, max_new_tokens=n, eos_token_id=-1) for b in batches],
        "vision": vision,
    }
    walls: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, fn in runs.items():
            walls[k].append(timed(fn))
    ms = {k: min(v) * 1000 / len(preps) for k, v in walls.items()}
    out = {
        "requests": len(preps), "new_tokens": n, "repeats": args.repeats, "ms_per_item_min": {k: round(v, 1) for k, v in ms.items()},
        "engine": {"vision": round(ms["vision"], 1), "prefill": round(ms["engine_1"] - ms["vision"], 1),
                   "decode": round(ms["engine_n"] - ms["engine_1"], 1), "total": round(ms["engine_n"], 1)},
        "alone": {"vision": round(ms["vision"], 1), "prefill": round(ms["alone_1"] - ms["vision"], 1),
                  "decode": round(ms["alone_n"] - ms["alone_1"], 1), "total": round(ms["alone_n"], 1)},
        "ratio_of_minima": round(ms["alone_n"] / ms["engine_n"], 2),
        "ratio_per_repeat": [round(a / e, 2) for a, e in zip(walls["alone_n"], walls["engine_n"])],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
