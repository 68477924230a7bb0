"""The engine's CUDA path at the released models' real sizes, on fake CUDA tensors: no GPU, no weights.

    python bench/fake_cuda.py --processor <any smoke checkpoint dir> [--variants tiny small base] [--json F]

Needs a CUDA build of torch (e.g. `pip install torch==2.11.0`, the device image's version: it imports and
runs this without a GPU or driver); torch's CPU-only builds refuse views of fake CUDA tensors.

Every device tensor is a FakeTensor (shapes, dtypes, devices and strides propagate through torch's own
meta kernels; nothing is allocated), host tensors stay real. So a run checks, before a GPU is lent:
* that the CUDA branches run at bf16 and the real shapes (grouped expert products, MLA absorbed decode,
  masked continued chunks, bucketed decode steps gathered, in place and through the paged kernel, whose
  launch is stubbed: its arguments are checked, its body runs in the interpreter tests, the vision tower on
  7 tiles);
* that the memory planner sizes the cache from an H200's free memory after the weights
  (`torch.cuda.mem_get_info` is answered with it);
* that no step reads a device value on the host except the sampled tokens: a read of a fake tensor's value
  (`.item()`, `.tolist()`, `int()`, a boolean-mask index) raises; `sample` runs on the fakes and its tokens
  are then given on the host (token 5), so that the engine's own read of them reads real values;
* and it counts the host-to-device copies per step (each a stream sync unless pinned and non-blocking).
It does not check values or speed: that is `bench/gpu_check.py` and `bench/gpu_engine.py` on the device.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._pytree import tree_leaves, tree_map

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model.engine as engine_module  # noqa: E402
import model.paged_attention as paged_attention  # noqa: E402
from model import Engine, SamplingParams  # noqa: E402
from model.bench import synthetic_requests  # noqa: E402
from model.config import VL2Config  # noqa: E402
from model.language import Rotary  # noqa: E402
from model.loading import build_empty, load_processor  # noqa: E402
from model.presets import make_config  # noqa: E402

CONFIGS = {  # engine keyword overrides; the default CUDA engine captures graphs, which need a driver, and
    # checks the paged kernel, which cannot run on fakes: here it is asked for (its launch stubbed, see below)
    "default (graphs: capture fails here, eager fallback)": {"paged_attention": True},
    "bucketed decode, paged kernel": {"cuda_graphs": False, "static_decode": True, "paged_attention": True},
    "packed decode, paged kernel": {"cuda_graphs": False, "paged_attention": True},
    "bucketed decode, gathered": {"cuda_graphs": False, "static_decode": True, "paged_attention": False},
    "bucketed decode, in place": {"cuda_graphs": False, "static_decode": True, "in_place_decode": True,
                                  "paged_attention": False},
    "packed decode, gathered": {"cuda_graphs": False, "paged_attention": False},
    "packed decode, in place": {"cuda_graphs": False, "in_place_decode": True, "paged_attention": False},
    # the sampled path: every row drawn in one call, top-p, the repetition penalty's seen-token table
    "bucketed decode, sampled": {"cuda_graphs": False, "static_decode": True, "paged_attention": False,
                                 "sampling": {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1}},
}


def stub_launch(launches: collections.Counter):
    """The paged kernel's launch on fakes: Triton needs real device pointers, so the kernel body is not run
    (tests/test_paged_attention.py runs it in the interpreter); this checks what the engine hands it, that
    every tensor is a device tensor (a host one would be a copy or a fault on a GPU) and every other argument
    a plain number (a device value read on the host would have raised already), then returns; the outputs it
    would write are the wrapper's `torch.empty` fakes, which the split join then reads."""
    class Launch:
        def __getitem__(self, grid):
            assert all(isinstance(g, int) and g > 0 for g in grid), grid

            def run(*args, **const):
                for a in args:
                    if isinstance(a, torch.Tensor):
                        assert isinstance(a, FakeTensor) and a.device.type == "cuda", (type(a), a.device)
                    else:
                        assert isinstance(a, (int, float)), type(a)
                launches[grid[2]] += 1  # by splits
            return run
    return lambda: Launch()


class HostRealMode(FakeTensorMode):
    """Fake CUDA tensors, real host ones: an op with no fake argument and no CUDA device runs for real (the
    engine's host bookkeeping on the processor's CPU tensors); any other is faked, its real CPU inputs first
    made fakes (counted: host-to-device copies)."""

    def __init__(self):
        super().__init__(allow_non_fake_inputs=True)
        self.ops: collections.Counter = collections.Counter()
        self.h2d = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = tree_leaves((args, kwargs))
        if not any(isinstance(a, FakeTensor) for a in leaves) and not any(
                isinstance(a, torch.device) and a.type == "cuda" for a in leaves):
            if kwargs.get("pin_memory"):  # no driver to pin with; pinning changes no value
                kwargs = {**kwargs, "pin_memory": False}
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        self.ops[str(func)] += 1
        self.h2d += any(type(a) is torch.Tensor and a.device.type == "cpu" and a.dim() > 0 for a in leaves)

        def fake(a):
            return self.from_tensor(a) if type(a) in (torch.Tensor, torch.nn.Parameter) else a
        return super().__torch_dispatch__(func, types, tree_map(fake, args), tree_map(fake, kwargs))


def tokens_on_host(real_sample):
    """`sample` run on the fakes (its ops and shapes), its tokens then given as a host tensor of 5s, so that
    `Engine._sample` runs as it is and its `nxt.tolist()`, the step's one intended device read, reads them."""
    def sample(logits, params, *args):
        assert real_sample(logits, params, *args).shape == (len(params),)
        return torch.full((len(params),), 5)
    return sample


def run_variant(variant: str, processor, requests: int, new_tokens: int, gpu_gib: float) -> dict:
    cfg = VL2Config.model_validate(make_config(variant, "full"))
    meta = build_empty(cfg, torch.device("meta"), torch.bfloat16)
    weights = sum(p.numel() * p.element_size() for p in meta.parameters())
    preps = [p for pair in zip(synthetic_requests(processor, "catalog", requests // 2),
                               synthetic_requests(processor, "page", requests - requests // 2)) for p in pair]
    mode = HostRealMode()
    out = {"weights_gb": round(weights / 1e9, 2), "configs": {}}
    total = int(gpu_gib * 2**30)
    real_mem_get_info, real_sample = torch.cuda.mem_get_info, engine_module.sample
    real_compiled, real_available = paged_attention._compiled, paged_attention.available
    real_programs = paged_attention._programs_wanted
    torch.cuda.mem_get_info = lambda device=None: (total - weights, total)  # an H200 after loading the weights
    engine_module.sample = tokens_on_host(real_sample)
    launches: collections.Counter = collections.Counter()
    paged_attention._compiled = stub_launch(launches)
    engine_module.paged_kernel_available = lambda: True
    paged_attention._programs_wanted = lambda index: 2 * 132  # an H200's 132 multiprocessors, twice
    try:
        with mode, torch.inference_mode():
            model = meta.to_empty(device=torch.device("cuda")).eval()
            for m in model.modules():  # host tables a GPU run copies to the device once: fakes here
                if isinstance(m, Rotary):
                    m.inv_freq = mode.from_tensor(m.inv_freq)
            for name, opts in CONFIGS.items():
                out["configs"][name] = run_config(model, processor, preps, opts, new_tokens, mode)
    finally:
        torch.cuda.mem_get_info, engine_module.sample = real_mem_get_info, real_sample
        paged_attention._compiled, paged_attention._programs_wanted = real_compiled, real_programs
        engine_module.paged_kernel_available = real_available
    out["paged_launches_by_splits"] = dict(sorted(launches.items()))
    return out


def run_config(model, processor, preps, opts: dict, new_tokens: int, mode: HostRealMode) -> dict:
    t0 = time.perf_counter()
    row: dict = {"ok": False}
    try:
        opts = dict(opts)
        sampling = opts.pop("sampling", {})
        engine = Engine(model, processor, **opts)
        row["plan"] = {"cache_tokens": engine.plan.tokens, "block_size": engine.plan.block_size,
                       "max_seqs": engine.plan.max_seqs, "max_step_tokens": engine.plan.max_step_tokens,
                       "cache_gb": round(engine.plan.budget_bytes / 1e9, 1)}
        futures = [engine.submit(p, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True,
                                                   seed=i if sampling else None, **sampling))
                   for i, p in enumerate(preps)]
        steps = []
        while engine.has_work():
            ops, h2d = sum(mode.ops.values()), mode.h2d
            decoding = sum(not s.prefilling for s in engine._running)
            n = engine.step()
            steps.append({"tokens": n, "decoding": decoding, "ops": sum(mode.ops.values()) - ops,
                          "h2d": mode.h2d - h2d})
            if len(steps) > 10 * len(preps) * new_tokens:
                raise RuntimeError("the engine does not finish")
        results = [f.result() for f in futures]
        only = [s for s in steps if s["tokens"] == s["decoding"] > 0]
        mixed = [s for s in steps if s["tokens"] > s["decoding"]]
        errors = [r.error for r in results if r.finish_reason == "error"]
        row.update(
            ok=not errors and all(r.finish_reason == "length" and len(r.tokens) == new_tokens for r in results),
            errors=errors[:3], steps=len(steps),
            decode_only_steps=len(only),
            h2d_per_step_max={"decode-only": max((s["h2d"] for s in only), default=None),
                              "with prefill": max((s["h2d"] for s in mixed), default=None)},
            grouped_mm_calls=mode.ops["aten._grouped_mm.default"], paged_attention=engine.paged_attention,
            stats={k: v for k, v in engine.stats.items() if k not in ("cuda_graph_capture_ms",)},
            graphs_fallback=engine.static.fallback if engine.static else None)
    except Exception as e:  # noqa: BLE001 - report which variant/config broke and go on
        row["exception"] = f"{type(e).__name__}: {e}"
    row["seconds"] = round(time.perf_counter() - t0, 1)
    mode.ops.clear()
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processor", required=True, help="any checkpoint dir with the tokenizer (a smoke one does)")
    ap.add_argument("--variants", nargs="+", default=["tiny", "small", "base"])
    ap.add_argument("--requests", type=int, default=48, help="half catalog photos, half pages")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--gpu-gib", type=float, default=139.8, help="the device's memory (H200: ~139.8 GiB usable)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import logging
    logging.basicConfig(level=logging.ERROR)  # the expected graphs fallback logs a warning per config
    processor = load_processor(args.processor)
    report = {"torch": torch.__version__, "requests": args.requests, "new_tokens": args.new_tokens, "variants": {}}
    for v in args.variants:
        report["variants"][v] = run_variant(v, processor, args.requests, args.new_tokens, args.gpu_gib)
        for name, row in report["variants"][v]["configs"].items():
            print(f"{v:5s} {name:52s} ok={row['ok']} steps={row.get('steps')} "
                  f"h2d/step={row.get('h2d_per_step_max')} {row.get('exception') or (row.get('errors') or [''])[0]}",
                  flush=True)
    report["ok"] = all(r["ok"] for v in report["variants"].values() for r in v["configs"].values())
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(json.dumps({"ok": report["ok"], "torch": report["torch"]}))
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
