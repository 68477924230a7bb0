"""Host time per engine step, with the device's work taken out.

On a GPU a decode step's kernels run while the host waits for its sampled tokens (the step's one sync),
and the host's own work for the next step (scheduling, block tables, sampling bookkeeping, the n-gram
guard) runs while the GPU idles. So that host time is added to every step, and it grows with the number
of sequences decoding. This measures it on any machine: the decoder pass and the vision tower are
replaced by zeros of their shapes (`forward_step`, `image_rows`), everything else is the engine's own
code, run to the end of every request.

    python bench/step_host_bench.py --checkpoint DIR [--sequences 16 64 256] [--path static packed]
        [--ngram 0 30 --window 90] [--temperature T] [--json FILE]

Prints a line per (path, guard, sequences) with the median host ms of a decode-only step, and last one
JSON object with all of them.
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

import model.engine as engine_mod  # noqa: E402
from model import Engine, SamplingParams, load_pretrained  # noqa: E402
from model.bench import synthetic_requests  # noqa: E402


def _no_device_work(hidden: int, vocab: int):
    """Stand-ins for the device's work: zeros of the decoder pass's and the vision tower's shapes."""
    def forward_step(language, step, cache):
        rows = step.logit_rows
        n = rows.stop - rows.start if isinstance(rows, slice) else len(rows)
        return torch.zeros(n, vocab)

    def image_rows(model, preps, processor=None):
        return [torch.zeros(int(p.images_seq_mask.sum()), hidden) for p in preps]

    return forward_step, image_rows


def measure(model, processor, prepared, path: str, params: SamplingParams) -> dict:
    n = len(prepared)
    tokens = n * (max(len(p) for p in prepared) + params.max_new_tokens + 512)
    eng = Engine(model, processor, kv_cache_tokens=tokens, max_seqs=n, max_step_tokens=16384,
                 in_place_decode=False, static_decode=path == "static")
    if eng.static is not None:
        eng.static._forward = lambda key: None  # the bucketed step's device work: its logits stay zeros
        eng.static.logits.zero_()
    for p in prepared:
        eng.submit(p, params)
    decode_ms = []
    while eng.has_work():
        decoding = len(eng._running) == n and all(not s.prefilling for s in eng._running)
        t = time.perf_counter()
        eng.step()
        if decoding and len(eng._running) == n:  # every sequence decoding, before and after the step
            decode_ms.append((time.perf_counter() - t) * 1000)
    if not decode_ms:
        raise SystemExit(f"{n} sequences never decoded together (plan: {eng.plan})")
    return {"path": path, "sequences": n, "ngram": params.no_repeat_ngram_size, "window": params.no_repeat_window,
            "decode_steps": len(decode_ms), "host_ms_per_decode_step": round(statistics.median(decode_ms), 3),
            "host_us_per_sequence": round(statistics.median(decode_ms) * 1000 / n, 2),
            "static_decode_steps": int(eng.stats["static_decode_steps"])}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--workload", default="page", choices=["page", "catalog"])
    ap.add_argument("--sequences", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--path", nargs="+", default=["static", "packed"], choices=["static", "packed"],
                    help="static: the bucketed decode step (CUDA graphs' path); packed: the eager packed step")
    ap.add_argument("--ngram", type=int, nargs="+", default=[0, 30], help="no_repeat_ngram_size values (0: off)")
    ap.add_argument("--window", type=int, default=90, help="no_repeat_window of the guarded runs")
    ap.add_argument("--max-new-tokens", type=int, default=300)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else seeded sampling per request")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, processor = load_pretrained(args.checkpoint, device="cpu", dtype=torch.float32)
    lang = model.language
    engine_mod.forward_step, engine_mod.image_rows = _no_device_work(
        lang.model.embed_tokens.weight.shape[1], lang.lm_head.weight.shape[0])
    base = synthetic_requests(processor, args.workload, 1)[0]
    runs = []
    for path in args.path:
        for ngram in args.ngram:
            params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True, no_repeat_ngram_size=ngram,
                                    no_repeat_window=args.window if ngram else 0, temperature=args.temperature,
                                    seed=0 if args.temperature else None)
            for n in args.sequences:
                r = measure(model, processor, [base] * n, path, params)
                runs.append(r)
                print(f"{path:6s} ngram {ngram:2d}/{r['window']:3d}  {n:4d} sequences: "
                      f"{r['host_ms_per_decode_step']:.3f} ms per decode step ({r['host_us_per_sequence']} us per "
                      f"sequence)", flush=True)
    report = {"checkpoint": args.checkpoint, "workload": args.workload, "torch": torch.__version__,
              "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "runs": runs,
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
