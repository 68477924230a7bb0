"""Expert-parallel benchmark: prefill and decode steps over N processes, with the all-to-all time share
and the bytes each rank exchanges.

    python bench/ep_bench.py [--checkpoint DIR] [--world 1 2 4] [--device cpu|cuda] [--batch 4]
                             [--prompt 64] [--new-tokens 16] [--json OUT.json]

Every rank loads the checkpoint with `expert_parallel=True` (gloo on CPU, NCCL on CUDA with one GPU
per rank) and generates for its own `--batch` text-only sequences of `--prompt` random tokens; rank 0
of N=1 also times the plain single-process model, so the cost of the EP layer itself shows. Without
`--checkpoint` a random-weight checkpoint is written to a temp dir (small structure, see `--variant`
and `--language`). The all-to-all time is measured around the three collectives of each MoE layer
(counts, dispatch, combine) with a device sync, so it includes waiting for the slowest rank.

Then the projection of docs/performance.md ("Expert parallelism") for N=2, 4, 8: the bytes a rank
sends per decode step, from the measured off-rank share of the (token, expert) pairs scaled to the
projected model's hidden size, top-k and MoE layer count, at `--bandwidth-gbs` per GPU plus
`--latency-us` per all-to-all. The last line printed is the JSON (also written to `--json`).

`--engine`: every rank also runs its requests through its own continuous-batching `Engine` (collective
steps, model/engine.py) and reports the engine's wall time, steps, tokens/s and the all-to-all share of
that wall time (`engine_*` keys).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model import load_pretrained  # noqa: E402
from model.processor import BatchInputs  # noqa: E402
from model.smoke import write_smoke_checkpoint  # noqa: E402
from model.expert_parallel import join_group, leave_group, rendezvous_store  # noqa: E402

# The released deepseek-vl2 variants' decoder dims (model/presets.py) for the projection.
VARIANTS = {
    "tiny": {"hidden": 1280, "top_k": 6, "moe_layers": 11},
    "small": {"hidden": 2048, "top_k": 6, "moe_layers": 26},
    "base": {"hidden": 2560, "top_k": 6, "moe_layers": 29},
}
DEFAULT_LANGUAGE = {"hidden_size": 256, "moe_intermediate_size": 128, "n_routed_experts": 32,
                    "num_experts_per_tok": 6, "num_hidden_layers": 4}


def _inputs(batch: int, prompt: int, vocab: int, seed: int, device: str) -> BatchInputs:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab - 8, (batch, prompt), generator=g)
    return BatchInputs(
        input_ids=ids, attention_mask=torch.ones(batch, prompt, dtype=torch.bool),
        images_seq_mask=torch.zeros(batch, prompt, dtype=torch.bool),
        images=torch.zeros(batch, 1, 3, 1, 1), images_spatial_crop=torch.zeros(batch, 1, 2, dtype=torch.long),
    ).to(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_steps(model, device: str) -> list[float]:
    """Time every decoder call of `model` from now on (seconds, device-synced); the list fills as it runs."""
    times: list[float] = []
    decoder = model.language.forward

    def timed(*args, **kwargs):
        _sync(device)
        t0 = time.perf_counter()
        out = decoder(*args, **kwargs)
        _sync(device)
        times.append(time.perf_counter() - t0)
        return out

    model.language.forward = timed
    return times


def _rank(rank: int, world: int, port: int, cfg: dict, out: str) -> None:
    cuda = cfg["device"] == "cuda"
    device = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(cfg["threads"])
    join_group(rank, world, port, 300, "nccl" if cuda else "gloo")
    dtype = getattr(torch, cfg["dtype"])
    model, _ = load_pretrained(cfg["checkpoint"], device=device, dtype=dtype, expert_parallel=True)
    lang = model.cfg.language_config
    inputs = _inputs(cfg["batch"], cfg["prompt"], lang.vocab_size, seed=rank, device=device)
    gen = dict(max_new_tokens=cfg["new_tokens"], eos_token_id=-1)  # never stops early: all ranks run every step
    model.generate(inputs, **gen)  # warm-up
    steps = _time_steps(model, device)
    traffic = model.expert_parallel.record()
    for _ in range(cfg["repeats"]):
        model.generate(inputs, **gen)
    per_call = len(model.expert_parallel.layers)
    n = cfg["new_tokens"]
    prefill = [x for i, x in enumerate(traffic.exchanges) if (i // per_call) % n == 0]
    decode = [x for i, x in enumerate(traffic.exchanges) if (i // per_call) % n != 0]
    prefill_s = [t for i, t in enumerate(steps) if i % n == 0]
    decode_s = [t for i, t in enumerate(steps) if i % n != 0]
    elem = torch.finfo(dtype).bits // 8
    row = lang.hidden_size * elem
    counts_out = 8 * (lang.n_routed_experts - model.expert_parallel.layers[0].experts.gate_proj.shape[0])

    def moved(xs) -> dict:
        """What this rank sent to the others: its pairs' rows, the results of the rows it received, counts."""
        pairs = sum(sum(x.sent) for x in xs)
        off = sum(sum(x.sent) - x.sent[rank] for x in xs)
        results = sum(sum(x.received) - x.received[rank] for x in xs)
        return {"pairs": pairs, "off_rank_pairs": off, "bytes_sent": (off + results) * row + len(xs) * counts_out,
                "a2a_s": sum(x.seconds for x in xs)}

    p, d = moved(prefill), moved(decode)
    result = {
        "rank": rank, "prefill_ms": 1e3 * statistics.median(prefill_s),
        "decode_step_ms": 1e3 * statistics.median(decode_s),
        "a2a_share_prefill": p["a2a_s"] / sum(prefill_s), "a2a_share_decode": d["a2a_s"] / sum(decode_s),
        "decode_bytes_sent_per_step": d["bytes_sent"] / len(decode_s),
        "decode_off_rank_share": d["off_rank_pairs"] / max(d["pairs"], 1),
        "prefill_bytes_sent": p["bytes_sent"] / len(prefill_s),
        "expert_param_bytes": sum(t.numel() * t.element_size() for m in model.expert_parallel.layers
                                  for t in m.experts.parameters()),
    }
    if cfg.get("engine"):
        result.update(_engine_run(model, inputs, cfg, device))
    if world == 1:  # the plain model: what the EP layer costs by itself
        plain, _ = load_pretrained(cfg["checkpoint"], device=device, dtype=dtype)
        plain.generate(inputs, **gen)
        steps = _time_steps(plain, device)
        for _ in range(cfg["repeats"]):
            plain.generate(inputs, **gen)
        result["plain_prefill_ms"] = 1e3 * statistics.median(t for i, t in enumerate(steps) if i % n == 0)
        result["plain_decode_step_ms"] = 1e3 * statistics.median(t for i, t in enumerate(steps) if i % n != 0)
    torch.save(result, Path(out) / f"rank{rank}.pt")
    leave_group()


def run(world: int, cfg: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        store = rendezvous_store()  # kept alive until the ranks are done
        mp.start_processes(_rank, args=(world, store.port, cfg, out), nprocs=world, start_method="spawn")
        return [torch.load(Path(out) / f"rank{r}.pt") for r in range(world)]


def project(measured: dict[int, float], variant: str, batch: int, bandwidth_gbs: float, latency_us: float,
            elem: int = 2) -> list[dict]:
    """Per decode step and rank: bytes = 2 (dispatch + combine) · batch · top_k · off-rank share · hidden · elem
    per MoE layer; time = bytes / bandwidth + 3 all-to-alls · latency per MoE layer. Prefill: the same per
    1000 prompt tokens in one step."""
    v = VARIANTS[variant]
    rows = []
    for n in (2, 4, 8):
        share = measured.get(n, (n - 1) / n)
        per_layer = 2 * batch * v["top_k"] * share * v["hidden"] * elem
        step_bytes = per_layer * v["moe_layers"]
        t_bw = step_bytes / (bandwidth_gbs * 1e9)
        t_lat = 3 * v["moe_layers"] * latency_us * 1e-6
        prefill_bytes = step_bytes * 1000 / batch  # 1000 prompt tokens on this rank, one step
        rows.append({"world": n, "off_rank_share": share, "share_measured": n in measured,
                     "bytes_per_decode_step": step_bytes, "decode_comm_ms": 1e3 * (t_bw + t_lat),
                     "decode_bandwidth_ms": 1e3 * t_bw, "decode_latency_ms": 1e3 * t_lat,
                     "bytes_per_1k_prefill_tokens": prefill_bytes,
                     "prefill_comm_ms_per_1k_tokens": 1e3 * (prefill_bytes / (bandwidth_gbs * 1e9) + t_lat)})
    return rows


def _engine_run(model, inputs: BatchInputs, cfg: dict, device: str) -> dict:
    """This rank's requests through its own Engine (collective steps): wall time and all-to-all share."""
    from model import Engine, SamplingParams
    from model.processor import PreparedInput

    preps = [PreparedInput(input_ids=ids.cpu(), images_seq_mask=torch.zeros(len(ids), dtype=torch.bool),
                           images=torch.zeros(1, 3, 1, 1), images_spatial_crop=torch.zeros(1, 2, dtype=torch.long),
                           num_image_tokens=torch.zeros(1, dtype=torch.long)) for ids in inputs.input_ids]
    params = SamplingParams(max_new_tokens=cfg["new_tokens"], ignore_eos=True)
    engine = Engine(model, None, kv_cache_tokens=max(4096, 2 * len(preps) * (cfg["prompt"] + cfg["new_tokens"])))
    engine.generate(preps, params)  # warm-up
    traffic = model.expert_parallel.record()
    steps = engine.stats["steps"] + engine.stats["idle_steps"]
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(cfg["repeats"]):
        engine.generate(preps, params)
    _sync(device)
    wall = time.perf_counter() - t0
    tokens = cfg["repeats"] * len(preps) * cfg["new_tokens"]
    return {"engine_wall_s": wall, "engine_steps": engine.stats["steps"] + engine.stats["idle_steps"] - steps,
            "engine_tokens_per_s": tokens / wall, "engine_a2a_share": sum(x.seconds for x in traffic.exchanges) / wall}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="default: a random-weight checkpoint written to a temp dir")
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="small",
                    help="structure of the written checkpoint, and the released dims the projection uses")
    ap.add_argument("--language", type=json.loads, default=DEFAULT_LANGUAGE,
                    help="language_config overrides of the written checkpoint (JSON)")
    ap.add_argument("--world", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 on cuda")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per CPU rank")
    ap.add_argument("--batch", type=int, default=4, help="sequences per rank")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="timed generate calls (medians of their steps)")
    ap.add_argument("--project-batch", type=int, default=64, help="sequences per rank in the projection")
    ap.add_argument("--bandwidth-gbs", type=float, nargs="+", default=[450.0, 50.0],
                    help="per-GPU all-to-all bandwidth, GB/s each way (NVLink 4 ~450, PCIe 5 x16 ~50)")
    ap.add_argument("--latency-us", type=float, default=20.0, help="fixed cost of one all-to-all")
    ap.add_argument("--engine", action="store_true", help="also run every rank's requests through its Engine")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.device == "cuda" and max(args.world) > torch.cuda.device_count():
        ap.error(f"--world {max(args.world)} needs that many GPUs, this machine has {torch.cuda.device_count()}")
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or str(write_smoke_checkpoint(Path(tmp) / "ckpt", args.variant, "mini", seed=0,
                                                             language_overrides=args.language))
        cfg = {"checkpoint": ckpt, "device": args.device, "dtype": dtype, "threads": args.threads,
               "batch": args.batch, "prompt": args.prompt, "new_tokens": args.new_tokens,
               "repeats": args.repeats, "engine": args.engine}
        runs = {}
        for n in args.world:
            ranks = run(n, cfg)
            mean = lambda k: sum(r[k] for r in ranks) / n  # noqa: E731
            runs[n] = {
                "decode_step_ms": max(r["decode_step_ms"] for r in ranks),
                "prefill_ms": max(r["prefill_ms"] for r in ranks),
                "a2a_share_decode": mean("a2a_share_decode"), "a2a_share_prefill": mean("a2a_share_prefill"),
                "decode_bytes_sent_per_step": mean("decode_bytes_sent_per_step"),
                "decode_off_rank_share": mean("decode_off_rank_share"),
                "prefill_bytes_sent": mean("prefill_bytes_sent"),
                "expert_param_bytes_per_rank": ranks[0]["expert_param_bytes"],
                **({k: ranks[0][k] for k in ("plain_prefill_ms", "plain_decode_step_ms")} if n == 1 else {}),
                **({"engine_wall_s": max(r["engine_wall_s"] for r in ranks),
                    "engine_tokens_per_s": sum(r["engine_tokens_per_s"] for r in ranks),
                    "engine_a2a_share": mean("engine_a2a_share"),
                    "engine_steps": ranks[0]["engine_steps"]} if args.engine else {}),
            }
            print(f"N={n}: {json.dumps(runs[n])}", flush=True)
    measured = {n: r["decode_off_rank_share"] for n, r in runs.items() if n > 1}
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "cpus": torch.get_num_threads(), "torch": torch.__version__,
        "config": {**cfg, "checkpoint": args.checkpoint or f"written: {args.variant} mini + {args.language}"},
        "runs": runs,
        "projection": {
            "batch_per_rank": args.project_batch, "latency_us": args.latency_us,
            "variants": {v: {f"{bw:g}GB/s": project(measured, v, args.project_batch, bw, args.latency_us)
                             for bw in args.bandwidth_gbs} for v in VARIANTS},
        },
    }
    line = json.dumps(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(line)
    return report


if __name__ == "__main__":
    main()
