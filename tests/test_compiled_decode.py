"""The compiled CPU decode step (model/compiled_decode.py): the engine's tokens stay `model.generate`'s."""
import logging

import pytest
import torch

from model import Engine, SamplingParams, load_pretrained
from model.compiled_decode import CompiledDecode, _padded_experts, unsupported
from model.language import Experts
from tests.test_engine import PARAMS, check_results, oracle, workload
from tests.test_model_golden import load_cases


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    """One model for every test here: the compiled graph is kept on it, so it is compiled once."""
    model, processor = load_pretrained(fixtures_dir / "tiny_mha-seed1")
    cases = load_cases(fixtures_dir / "tiny_mha-seed1.golden.npz")
    preps = {c: processor.prepare(g["conversation"], g["images"]) for c, g in cases.items()}
    return model, processor, preps


def test_padded_expert_product_matches_the_experts(fixtures_dir):
    torch.manual_seed(0)
    experts = Experts(16, 64, 32)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    for n in (2, 5, 16, 40):
        x = torch.randn(n, 64)
        idx = torch.stack([torch.randperm(16)[:4] for _ in range(n)])
        weight = torch.rand(n, 4)
        got = _padded_experts(x, idx, weight, experts.joined(), experts.down_proj)
        torch.testing.assert_close(got, experts(x, idx, weight), rtol=1e-5, atol=1e-6)


def test_engine_with_the_compiled_step_equals_generate_alone(tiny):
    model, processor, preps = tiny
    # equal prompts: their reservations form one strided run, the case the compiled step takes; greedy,
    # seeded sampling, top-p and repetition penalty
    same = [(preps["text_only"], p) for p in PARAMS] + [(preps["text_only"], SamplingParams(max_new_tokens=14))]
    # and the whole mixed workload (text only, 1-3 images), where most steps are of other kinds and run eagerly
    for items in (same, workload(preps)):
        want = [oracle(model, processor, prep, p) for prep, p in items]
        engine = Engine(model, processor, kv_cache_tokens=16384, max_step_tokens=256, max_seqs=8,
                        compiled_decode=True)
        results = engine.generate([p for p, _ in items], [p for _, p in items])
        check_results("tiny_mha", items, results, want)
        assert engine.compiled is not None and engine.compiled_fallback is None
        if items is same:
            assert engine.stats["compiled_decode_steps"] >= 8  # the decode-only steps of 2+ sequences
    assert CompiledDecode.for_model(model.language) is engine.compiled  # one per model, shared by its engines


def test_the_default_and_what_it_does_not_cover(tiny, fixtures_dir, monkeypatch):
    model, processor, preps = tiny
    monkeypatch.delenv("PAGEMILL_COMPILED_DECODE", raising=False)
    assert Engine(model, processor, kv_cache_tokens=4096).compiled is not None  # CPU default (compiles lazily)
    assert Engine(model, processor, kv_cache_tokens=4096, in_place_decode=False).compiled is None
    # by default it starts at a decode-only step of Engine.COMPILE_AT sequences: fewer run eagerly
    few = [(preps["text_only"], SamplingParams(max_new_tokens=5)) for _ in range(Engine.COMPILE_AT - 1)]
    for items, compiled in ((few, False), (few + few[:1], True)):
        engine = Engine(model, processor, kv_cache_tokens=16384)
        results = engine.generate([p for p, _ in items], [p for _, p in items])
        assert [r.tokens for r in results] == [oracle(model, processor, prep, p) for prep, p in items]
        assert (engine.stats["compiled_decode_steps"] > 0) == compiled
    monkeypatch.setenv("PAGEMILL_COMPILED_DECODE", "0")
    assert Engine(model, processor, kv_cache_tokens=4096).compiled is None
    mla, mla_processor = load_pretrained(fixtures_dir / "small_mla-seed1")
    assert "MLA" in unsupported(mla.language)
    with pytest.raises(ValueError, match="MLA"):
        Engine(mla, mla_processor, kv_cache_tokens=4096, compiled_decode=True)
    cfg = model.language.cfg
    monkeypatch.setattr(cfg, "n_routed_experts", 64)  # 64 experts for 4 chosen: 16x the routed rows
    assert "waste" in unsupported(model.language)


def test_a_failing_compiled_step_falls_back_to_eager_with_the_same_tokens(tiny, fixtures_dir, caplog):
    _, _, preps = tiny
    model, processor = load_pretrained(fixtures_dir / "tiny_mha-seed1")  # its own: this test breaks its graph
    items = [(preps["text_only"], SamplingParams(max_new_tokens=6)) for _ in range(3)]
    engine = Engine(model, processor, kv_cache_tokens=16384, compiled_decode=True)

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    engine.compiled._fn = broken
    with caplog.at_level(logging.WARNING, logger="model.compiled_decode"):
        results = engine.generate([p for p, _ in items], [p for _, p in items])
    for (prep, p), r in zip(items, results):
        assert r.tokens == oracle(model, processor, prep, p)
    assert engine.compiled is None and "no C++ compiler" in engine.compiled_fallback
    assert engine.stats["compiled_decode_steps"] == 0 and "compiled CPU decode off" in caplog.text
    again = Engine(model, processor, kv_cache_tokens=4096, compiled_decode=True)  # not tried again on this model
    assert again.compiled is None and again.compiled_fallback == engine.compiled_fallback
