"""Expert parallelism over 2 and 4 gloo ranks (processes on this machine) equals the single-process model.

Each rank loads only its share of the routed experts and runs its own inputs (a left-padded batch with an
image, short texts, prefill in chunks, different generation lengths, None, a bad input); logits and greedy
tokens must equal the single-process model's on the same inputs within 1e-5 (float32). The ranks also report their
routed-expert memory, what they read while loading, and every all-to-all, so the test can check the
sharding is 1/N and that the uneven cases (a rank receiving no tokens) really happened.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image, ImageDraw

from safetensors.torch import load_file, save_file

from model import CheckpointError, load_pretrained
from model.checkpoint import CheckpointReader
from model.expert_parallel import ExpertParallelMoE, join_group, leave_group, rendezvous_store
from model.language import Experts
from tests.conftest import FIXTURES

CHECKPOINTS = [
    FIXTURES / "tiny_mha-seed1",
    FIXTURES / "small_mla-seed1",
    Path(__file__).parent / "data" / "ref-extra" / "noaux_grouped_mla-seed3",
]
ATOL = 1e-5
RANK_TIMEOUT_S = 90  # a collective waiting longer than this raises in the rank
RUN_TIMEOUT_S = 240  # and the whole group is killed after this
ROUTED = ".mlp.experts."


def _conv(text: str, image: bool = False) -> list[dict]:
    return [{"role": "<|User|>", "content": ("<image>\n" if image else "") + text}, {"role": "<|Assistant|>", "content": ""}]


def _image() -> Image.Image:
    img = Image.new("RGB", (300, 200), (240, 240, 230))
    ImageDraw.Draw(img).ellipse((40, 30, 160, 150), fill=(200, 30, 30))
    return img


def _first_moe(model) -> int:
    return next(i for i, layer in enumerate(model.language.model.layers) if hasattr(layer.mlp, "experts"))


@torch.no_grad()
def avoiding_last_rank(model, world: int, n: int, seed: int) -> torch.Tensor:
    """n hidden states [n, H] that the first MoE layer's gate routes to no expert of the last rank: built from
    the gate rows of the other ranks' experts plus noise, checked with the gate itself."""
    gate = model.language.model.layers[_first_moe(model)].mlp.gate
    e = gate.weight.shape[0]
    others = e - e // world  # experts of ranks 0..N-2
    g = torch.Generator().manual_seed(seed)
    picked = []
    while len(picked) < n:
        chosen = torch.randperm(others, generator=g)[: gate.top_k]
        x = gate.weight[chosen].sum(0) * 4.0 + torch.randn(gate.weight.shape[1], generator=g) * 0.1
        if int(gate(x[None])[0].max()) < others:
            picked.append(x)
    return torch.stack(picked)


def plan(model, processor, world: int) -> list[list[tuple[str, object, dict]]]:
    """Per rank, the same sequence of collective calls, each with this rank's own inputs (None: nothing to run)."""
    layer = _first_moe(model)
    batch = processor([_conv("Describe the image.", True), _conv("Read the text of the chart.")], [[_image()], []])
    texts = [processor(_conv("Where is the giraffe? " * (r + 1))) for r in range(world)]
    bad = processor([_conv("Describe the image.", True)], [[_image()]])
    bad.images_seq_mask[0, bad.images_seq_mask[0].nonzero()[0]] = False  # one placeholder short
    calls = []
    for r in range(world):
        own = batch if r == 0 else texts[r]
        gen_none = world > 2 and r == world - 2
        calls.append([
            ("forward", None if r == world - 1 else own, {}),
            ("generate", None if gen_none else own,
             # rank 1 generates longest: its last steps are one-token decode steps with every other rank idle
             {"max_new_tokens": 7 if r == 1 else 2 + r, "prefill_chunk": 5 if r == 1 else None, "return_logits": True}),
            ("forward", None, {}),  # everyone idle: returns at once
            # rank 0's input is bad: it raises, but only after serving the others, who get their logits
            ("forward", bad if r == 0 else own, {"error": r == 0}),
            # the MoE layer alone, every rank sending tokens none of which go to the last rank
            ("moe", avoiding_last_rank(model, world, 2 + r, seed=r), {"layer": layer}),
        ])
    return calls


def _count_reads(log: dict):
    """Wrap CheckpointReader.get: bytes of routed-expert tensors read, and the peak of those alive at once."""
    original = CheckpointReader.get

    def get(self, key, *args, **kwargs):
        t = original(self, key, *args, **kwargs)
        if ROUTED in key:
            n = t.numel() * t.element_size()
            log["keys"].append(key)
            log["read"] += n
            log["live"] += n
            log["peak_live"] = max(log["peak_live"], log["live"])
            weakref.finalize(t, lambda: log.__setitem__("live", log["live"] - n))
        return t

    CheckpointReader.get = get


@torch.inference_mode()
def call(model, fn: str, inputs, kw: dict):
    if fn == "moe":
        return model.language.model.layers[kw["layer"]].mlp(inputs)
    kw = dict(kw)
    if kw.pop("error", False):
        try:
            getattr(model, fn)(inputs, **kw)
        except ValueError as e:
            return f"ValueError: {e}"
        return "no error"
    return getattr(model, fn)(inputs, **kw)


def _rank(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    join_group(rank, world, port, RANK_TIMEOUT_S)
    reads = {"keys": [], "read": 0, "live": 0, "peak_live": 0}
    _count_reads(reads)
    calls = torch.load(Path(out) / "plan.pt", weights_only=False)
    results = {}
    for ckpt in CHECKPOINTS:
        reads.update(keys=[], read=0, live=0, peak_live=0)
        model, _ = load_pretrained(ckpt, expert_parallel=True)
        experts = [m.experts for m in model.modules() if isinstance(m, ExpertParallelMoE)]
        expert_bytes = sum(p.numel() * p.element_size() for e in experts for p in e.parameters())
        traffic = model.expert_parallel.record()
        outputs = [call(model, fn, inputs, kw) for fn, inputs, kw in calls[ckpt.name][rank]]
        results[ckpt.name] = {
            "outputs": outputs,
            "expert_bytes": expert_bytes,
            "loading": {k: reads[k] for k in ("keys", "read", "peak_live")},
            "exchanges": [(x.sent, x.received) for x in traffic.exchanges],
        }
    torch.save(results, Path(out) / f"rank{rank}.pt")
    leave_group()


def run_group(world: int, calls: dict, tmp: Path, fn=None) -> list:
    """Run `fn` (default: the plan runner) on `world` gloo ranks; each rank's result from tmp/rank{r}.pt."""
    torch.save(calls, tmp / "plan.pt")
    store = rendezvous_store()  # kept alive until the ranks are done
    ctx = mp.start_processes(fn or _rank, args=(world, store.port, str(tmp)), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"expert-parallel group of {world} did not finish in {RUN_TIMEOUT_S} s (a hung collective?)")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def references(fixtures_dir):
    """Single-process models and the full routed-expert size of each checkpoint."""
    out = {}
    for ckpt in CHECKPOINTS:
        model, processor = load_pretrained(ckpt)
        full = sum(p.numel() * p.element_size() for m in model.modules() if isinstance(m, Experts) for p in m.parameters())
        out[ckpt.name] = (model, processor, full)
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_equals_single_process(world, references, tmp_path):
    calls = {name: plan(model, processor, world) for name, (model, processor, _) in references.items()}
    ranks = run_group(world, calls, tmp_path)
    for name, (model, _, full) in references.items():
        for r in range(world):
            got = ranks[r][name]
            assert len(got["outputs"]) == len(calls[name][r]), (name, r)
            for (fn, inputs, kw), out in zip(calls[name][r], got["outputs"]):
                if inputs is None:
                    assert out is None, (name, r, fn)
                    continue
                if kw.get("error"):
                    assert out.startswith("ValueError: sequence 0:") and "image placeholders" in out, (name, r, out)
                    assert call(model, fn, inputs, kw) == out, (name, r, "the single-process error")
                    continue
                want = call(model, fn, inputs, kw)
                if fn in ("forward", "moe"):
                    assert (out - want).abs().max().item() < ATOL, (name, r, fn)
                else:
                    assert out[0].tolist() == want[0].tolist(), (name, r, "greedy tokens")
                    assert out[1].shape == want[1].shape and (out[1] - want[1]).abs().max().item() < ATOL, (name, r)

            # memory: 1/N of the routed experts, and only the rank's own experts were ever read
            assert got["expert_bytes"] * world == full, (name, r, got["expert_bytes"], full)
            loading = got["loading"]
            assert loading["read"] == got["expert_bytes"], (name, r)
            n_experts = model.cfg.language_config.n_routed_experts
            own = range(r * n_experts // world, (r + 1) * n_experts // world)
            assert {int(k.split(ROUTED)[1].split(".")[0]) for k in loading["keys"]} == set(own), (name, r)
            assert got["expert_bytes"] + loading["peak_live"] < full, (name, r, "peak while loading")

        # every rank saw the same number of exchanges; uneven loads, and a rank receiving nothing mid-step
        exchanges = [ranks[r][name]["exchanges"] for r in range(world)]
        assert len({len(x) for x in exchanges}) == 1, name
        received = [[sum(x[i][1]) for x in exchanges] for i in range(len(exchanges[0]))]
        sent = [[sum(x[i][0]) for x in exchanges] for i in range(len(exchanges[0]))]
        assert any(len(set(rec)) > 1 for rec in received), (name, "no uneven step")
        assert any(0 in rec and sum(s) > 0 for rec, s in zip(received, sent)), (name, "no rank ever received nothing")
        # a decode step of one token from one rank took place (the others idle)
        assert any(sorted(s)[-2] == 0 and max(s) == model.cfg.language_config.num_experts_per_tok for s in sent), name


def _load_error(rank: int, world: int, port: int, out: str) -> None:
    join_group(rank, world, port, RANK_TIMEOUT_S)
    ckpt = torch.load(Path(out) / "plan.pt", weights_only=False)
    try:
        load_pretrained(ckpt, expert_parallel=True)
        error = "loaded"
    except CheckpointError as e:
        error = str(e)
    torch.save(error, Path(out) / f"rank{rank}.pt")
    leave_group()


def test_every_rank_names_a_missing_expert_of_another_rank(tmp_path):
    """The header is checked for every rank's experts, so a key missing from rank 1's share fails rank 0 too
    (the same error on all ranks, instead of rank 0 waiting for a rank that failed)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(CHECKPOINTS[0], ckpt)
    gone = "language.model.layers.1.mlp.experts.12.up_proj.weight"  # expert 12 of 16: rank 1's
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = ckpt / index["weight_map"].pop(gone)
    tensors = load_file(str(shard))
    del tensors[gone]
    shard.unlink()
    save_file(tensors, str(shard))
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    run = tmp_path / "run"
    run.mkdir()
    errors = run_group(2, ckpt, run, _load_error)
    for error in errors:
        assert f"missing keys: {gone}" in error, error


def test_none_without_expert_parallel_is_an_error(references):
    model = references["tiny_mha-seed1"][0]
    with pytest.raises(ValueError, match="only an expert-parallel rank may pass None"):
        model(None)
    with pytest.raises(ValueError, match="only an expert-parallel rank may pass None"):
        model.generate(None)


def test_expert_parallel_needs_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="initialized torch.distributed process group"):
        load_pretrained(CHECKPOINTS[0], expert_parallel=True)


def test_ep_bench_reports_traffic(tmp_path):
    """bench/ep_bench.py end to end on 1 and 2 gloo ranks: measured shares and bytes are consistent."""
    out = tmp_path / "ep.json"
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "bench" / "ep_bench.py"), "--world", "1", "2", "--batch", "2",
                    "--prompt", "8", "--new-tokens", "3", "--repeats", "1", "--engine", "--json", str(out)],
                   timeout=RUN_TIMEOUT_S, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    one, two = report["runs"]["1"], report["runs"]["2"]
    assert one["decode_bytes_sent_per_step"] == 0 and two["decode_bytes_sent_per_step"] > 0
    assert 0 < two["a2a_share_decode"] < 1 and 0 < two["a2a_share_prefill"] < 1
    assert 0 < two["decode_off_rank_share"] < 1
    assert two["expert_param_bytes_per_rank"] * 2 == one["expert_param_bytes_per_rank"]
    # the engine mode: one prefill step and two decode steps per run, all-to-all a share of its wall time
    assert one["engine_steps"] == two["engine_steps"] == 3
    assert 0 < two["engine_a2a_share"] < 1 and two["engine_tokens_per_s"] > 0
    rows = report["projection"]["variants"]["base"]["450GB/s"]
    assert [r["world"] for r in rows] == [2, 4, 8] and rows[0]["share_measured"] and not rows[2]["share_measured"]
    assert rows[0]["bytes_per_decode_step"] < rows[1]["bytes_per_decode_step"] < rows[2]["bytes_per_decode_step"]
