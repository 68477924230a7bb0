"""The paged decode kernel (model/paged_attention.py), run on CPU in Triton's interpreter (tests/conftest.py
sets TRITON_INTERPRET=1), against plain softmax attention and, inside the engine, against `model.generate`."""
import pytest
import torch

import model.paged_attention as pa
from model import Engine, SamplingParams, load_pretrained
from tests.test_engine import oracle
from tests.test_model_golden import load_cases


def test_the_interpreter_is_what_runs_here():
    # the kernel's CPU path is the interpreter: without it every test below would be meaningless
    assert pa.available() and pa.interpreted()


def _case(batch, heads, kv_heads, dim, page, lengths, mla=False, rope=8, extra_blocks=2):
    gen = torch.Generator().manual_seed(batch * 100 + dim + len(lengths))
    width = max(-(-n // page) for n in lengths) + extra_blocks  # entries past a length point anywhere
    blocks = batch * width + 3
    slots = blocks * page
    q = torch.randn(batch, heads, dim, generator=gen)
    if mla:
        k, v = torch.randn(1, slots, dim, generator=gen), None
        qr, kr = torch.randn(batch, heads, rope, generator=gen), torch.randn(slots, rope, generator=gen)
    else:
        k, v = torch.randn(kv_heads, slots, dim, generator=gen), torch.randn(kv_heads, slots, dim, generator=gen)
        qr = kr = None
    tables = torch.randperm(blocks, generator=gen)[: batch * width].view(batch, width)  # scattered blocks
    return q, k, v, tables, torch.tensor(lengths), page, qr, kr


@pytest.mark.parametrize("kind", ["mha", "gqa", "mla", "mla-16-heads"])
def test_kernel_matches_softmax_attention_over_the_gathered_tokens(kind):
    # lengths of one token, a block exactly, across blocks, and long enough that the tokens come in splits
    if kind == "mha":
        args = _case(4, 4, 4, 16, 16, [1, 16, 37, 300])
    elif kind == "gqa":
        args = _case(3, 8, 2, 32, 16, [5, 64, 130])
    elif kind == "mla":
        args = _case(3, 4, 1, 32, 16, [1, 90, 513], mla=True)
    else:
        args = _case(2, 16, 1, 32, 32, [33, 260], mla=True, rope=16)
    q, k, v, tables, lengths, page, qr, kr = args
    assert pa.splits_for(len(lengths), k.shape[0], tables.shape[1] * page, q.device, 16) > 1 or kind == "gqa"
    got = pa.paged_decode(q, k, v, tables, lengths, page, 0.25, q_rope=qr, k_rope=kr)
    want = pa.reference(q, k, v, tables, lengths, page, 0.25, q_rope=qr, k_rope=kr)
    assert got.shape == want.shape == (q.shape[0], q.shape[1], q.shape[2])
    assert (got - want).abs().max().item() < 1e-5
    # the tokens past a sequence's length are not read: changing them changes nothing
    table_slots = (tables[:, :, None] * page + torch.arange(page)).flatten(1)  # [B, W * page]
    read = torch.cat([table_slots[i, :n] for i, n in enumerate(lengths.tolist())])
    unread = table_slots.flatten()[~torch.isin(table_slots.flatten(), read)]
    assert len(unread) > 0
    k[:, unread] = 1e4
    if v is not None:
        v[:, unread] = -1e4
    if kr is not None:
        kr[unread] = 1e4
    again = pa.paged_decode(q, k, v, tables, lengths, page, 0.25, q_rope=qr, k_rope=kr)
    assert torch.equal(again, got)


def test_split_count_depends_only_on_the_shapes():
    # a CUDA graph holds one launch grid: the splits follow batch and table width, never the lengths
    dev = torch.device("cpu")
    assert pa.splits_for(8, 4, 2048, dev, 16) == pa.splits_for(8, 4, 2048, dev, 16) == 4
    assert pa.splits_for(8, 4, 128, dev, 16) == 1


@pytest.mark.parametrize("checkpoint", ["tiny_mha-seed1", "small_mla-seed1"])
def test_engine_decoding_through_the_kernel_equals_generate(fixtures_dir, checkpoint):
    """Every decode token through the paged kernel (no strided runs, no gathered copy): generate's tokens,
    for prompts of different lengths decoding side by side, greedy and seeded sampling."""
    model, processor = load_pretrained(fixtures_dir / checkpoint)
    cases = load_cases(fixtures_dir / "tiny_mha-seed1.golden.npz")
    preps = [processor.prepare(cases[c]["conversation"], cases[c]["images"]) for c in ("text_only", "grounding_ref")]
    params = [SamplingParams(max_new_tokens=5), SamplingParams(max_new_tokens=4, temperature=0.9, seed=3)]
    engine = Engine(model, processor, kv_cache_tokens=4096, in_place_decode=False, paged_attention=True)
    engine._paged_check()  # what an engine on CUDA runs before it turns the kernel on
    got = engine.generate(preps, params)
    assert [r.tokens for r in got] == [oracle(model, processor, p, sp) for p, sp in zip(preps, params)]
    assert engine.stats["in_place_tokens"] == 0 and engine.stats["decode_tokens"] > 0
    assert engine.stats["paged_decode_tokens"] == engine.stats["decode_tokens"]


def test_bucketed_steps_through_the_kernel_equal_generate(fixtures_dir):
    """The bucketed (CUDA-graph) decode steps with the kernel: padding rows read their one scratch slot,
    each real row only its own length of a table padded to the bucket's width."""
    model, processor = load_pretrained(fixtures_dir / "tiny_mha-seed1")
    cases = load_cases(fixtures_dir / "tiny_mha-seed1.golden.npz")
    preps = [processor.prepare(cases[c]["conversation"], cases[c]["images"]) for c in ("text_only", "grounding_ref")]
    params = [SamplingParams(max_new_tokens=4), SamplingParams(max_new_tokens=6)]
    engine = Engine(model, processor, kv_cache_tokens=4096, in_place_decode=False, paged_attention=True,
                    static_decode=True)
    got = engine.generate(preps * 2, params * 2)  # 4 rows: bucket 4; then the two longer ones in bucket 2
    assert [r.tokens for r in got] == [oracle(model, processor, p, sp) for p, sp in zip(preps * 2, params * 2)]
    assert engine.static.paged and engine.stats["static_decode_steps"] > 0
    assert engine.stats["static_decode_in_place_steps"] == 0


def test_a_kernel_that_disagrees_fails_the_engines_check(fixtures_dir, monkeypatch):
    model, processor = load_pretrained(fixtures_dir / "small_mla-seed1")
    engine = Engine(model, processor, kv_cache_tokens=1024, paged_attention=True)
    engine._paged_check()
    monkeypatch.setattr("model.language.paged_decode", lambda q, k, v, *a, **kw: torch.zeros_like(q[..., : k.shape[-1]]))
    with pytest.raises(RuntimeError, match="paged kernel differs"):
        engine._paged_check()


def test_kernel_compiles_for_hopper_at_the_released_layouts_without_spills():
    """No GPU here, but Triton compiles for sm_90 without one: at tiny's (MHA), small's and base's (MLA) real
    layouts the bf16 kernel must compile and fit its registers (a spill would make a memory-bound kernel
    slower than the gather it replaces). In a process of its own: the interpreter is off there."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(repo / "bench" / "paged_decode_bench.py"), "--compile-only", "90"],
                         capture_output=True, text=True, check=True, timeout=600,
                         env={**os.environ, "TRITON_INTERPRET": "0"}).stdout.strip().splitlines()
    report = json.loads(out[-1])
    for v in ("tiny", "small", "base"):
        row = report[f"{v}_bf16"]
        assert row["registers"] and row["registers"] <= 255 and row["spill_store_bytes"] == 0, (v, row)
    assert report["tiny_bf16"]["num_warps"] == 4 and report["small_bf16"]["shared_bytes"] < 227 * 1024


def test_the_engines_check_leaves_the_global_rng_alone(fixtures_dir):
    model, processor = load_pretrained(fixtures_dir / "tiny_mha-seed1")
    engine = Engine(model, processor, kv_cache_tokens=1024, paged_attention=True)
    torch.manual_seed(11)
    before = torch.get_rng_state()
    engine._paged_check()
    assert torch.equal(torch.get_rng_state(), before)
