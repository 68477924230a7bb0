"""The GPU acceptance check of the model, in one call: real-size tiny in bfloat16, and the reference
fixtures' greedy tokens in bfloat16 against float32.

    python bench/gpu_check.py --device cuda --fixtures DIR [DIR ...] [--json OUT.json]

1. Writes a real-size random-weight tiny checkpoint (`model.smoke`, bf16, ~6.7 GB) unless
   `--checkpoint` already holds one, and times it.
2. `model.bench` on it: load time and peak memory, then 2-image conversations (catalog workload).
3. For every fixture dir (`shared/fixtures/dsvl2-ref/<name>`, with `<name>.golden.npz` beside it) and
   every case: the greedy tokens in float32 and bfloat16 on `--device`, and in float32 computed on
   weights rounded to bfloat16, each compared with the reference's float32 tokens (leading tokens
   that agree). The reference's top-1/top-2 logit gap at each generated step says how near a tie
   the step that diverges was; the weights-only row says whether rounding the weights alone moves it.

The last line printed is the JSON written to `--json`. Needs no Ray: on the device machine only
pydantic must be carried (see docs/model.md, "GPU check").
"""
from __future__ import annotations

import argparse
import gc
import io
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model import load_pretrained  # noqa: E402
from model import bench as model_bench  # noqa: E402
from model.smoke import write_smoke_checkpoint  # noqa: E402


def _free(device: str) -> None:
    gc.collect()  # an engine's graphs and cache can sit in reference cycles
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _agree(got: list[int], want: list[int]) -> int:
    return next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))


def _gaps(gen_logits: np.ndarray) -> list[float]:
    """Reference top-1 minus top-2 logit per generated step: a small gap is a near-tie."""
    top2 = np.sort(gen_logits.reshape(gen_logits.shape[0], -1).astype(np.float64), axis=-1)[:, -2:]
    return [float(g) for g in top2[:, 1] - top2[:, 0]]


def fixture_agreement(fixture: Path, device: str) -> dict:
    """Greedy tokens per case in fp32, bf16 and fp32-on-bf16-rounded-weights, against the reference."""
    z = np.load(str(fixture) + ".golden.npz")
    cases: list[str] = json.loads(str(z["meta_json"]))["cases"]
    inputs, want, gaps = {}, {}, {}
    for case in cases:
        conv = json.loads(str(z[f"{case}__conversation_json"]))
        imgs = [Image.open(io.BytesIO(z[f"{case}__image{j}_png"].tobytes()))
                for j in range(int(z[f"{case}__num_images"]))]
        inputs[case] = (conv, imgs)
        want[case] = z[f"{case}__gen_tokens"].reshape(-1).tolist()
        gaps[case] = _gaps(z[f"{case}__gen_logits"])
    runs = {}
    for run, dtype, round_weights in (("float32", torch.float32, False), ("bfloat16", torch.bfloat16, False),
                                      ("float32_on_bf16_weights", torch.float32, True)):
        model, processor = load_pretrained(str(fixture), device=device, dtype=dtype)
        if round_weights:
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(p.to(torch.bfloat16).to(p.dtype))
        runs[run] = {}
        for case, (conv, imgs) in inputs.items():
            got = model.generate(processor(conv, imgs).to(device), max_new_tokens=len(want[case]))[0].tolist()
            runs[run][case] = got
        del model
        _free(device)
    out = {}
    for case in cases:
        row = {"of": len(want[case]), "reference_tokens": want[case],
               "reference_gap_min": round(min(gaps[case]), 6)}
        for run in runs:
            k = _agree(runs[run][case], want[case])
            row[f"{run}_agree"] = k
            if k < len(want[case]):
                row[f"{run}_tokens"] = runs[run][case]
                row[f"{run}_gap_at_divergence"] = round(gaps[case][k], 6)
        out[case] = row
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--checkpoint", type=Path, default=Path("/tmp/pagemill-tiny-full"),
                    help="real-size tiny checkpoint dir; written here if it has no config.json")
    ap.add_argument("--size", choices=["mini", "full"], default="full", help="mini: a quick dry run on CPU")
    ap.add_argument("--fixtures", type=Path, nargs="*", default=[])
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    result: dict = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
    }
    if not (args.checkpoint / "config.json").exists():
        t0 = time.perf_counter()
        write_smoke_checkpoint(args.checkpoint, "tiny", size=args.size, seed=0, dtype="bfloat16")
        result["write_checkpoint_s"] = round(time.perf_counter() - t0, 1)
        print(f"wrote {args.size} tiny to {args.checkpoint} in {result['write_checkpoint_s']}s", flush=True)
    result["checkpoint_gb"] = round(sum(p.stat().st_size for p in args.checkpoint.glob("*.safetensors")) / 1e9, 3)

    _free(args.device)
    result["tiny_two_images"] = model_bench.main([
        "--checkpoint", str(args.checkpoint), "--device", args.device, "--dtype", "bfloat16",
        "--workload", "catalog", "--images-per-request", "2", "--requests", str(args.requests),
        "--batch-size", str(args.requests), "--max-new-tokens", str(args.max_new_tokens)])
    _free(args.device)

    result["fixtures"] = {}
    for fixture in args.fixtures:
        print(f"fixture {fixture.name} ...", flush=True)
        result["fixtures"][fixture.name] = fixture_agreement(fixture, args.device)
    agree = [row["bfloat16_agree"] for f in result["fixtures"].values() for row in f.values()]
    result["bf16_cases_agreeing_8"] = f"{sum(a >= 8 for a in agree)}/{len(agree)}"
    text = json.dumps(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(text, flush=True)
    return result


if __name__ == "__main__":
    main()
