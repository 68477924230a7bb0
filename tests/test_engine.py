"""The continuous-batching engine against its oracle, `model.generate` one request at a time (float32, CPU)."""
import random
import threading
import time
from pathlib import Path

import pytest
import torch

from model import Engine, SamplingParams, load_pretrained
from model.language import Experts
from model.sampling import NgramGuard, banned_by_ngram, draw, sample, uniform
from tests.test_model_golden import load_cases

EXTRA = Path(__file__).parent / "data" / "ref-extra"
CHECKPOINTS = ["tiny_mha-seed1", "small_mla-seed1", "extra:noaux_grouped_mla-seed3"]

# (max_new_tokens, temperature, top_p, repetition_penalty, seed)
PARAMS = [
    SamplingParams(max_new_tokens=10),
    SamplingParams(max_new_tokens=7, temperature=0.8, top_p=0.9, seed=7),
    SamplingParams(max_new_tokens=12, repetition_penalty=1.3),
    SamplingParams(max_new_tokens=3, temperature=1.2, seed=123),
    SamplingParams(max_new_tokens=9, temperature=0.7, top_p=0.8, repetition_penalty=1.2, seed=5),
]


def _path(fixtures_dir, name):
    return EXTRA / name.split(":", 1)[1] if name.startswith("extra:") else fixtures_dir / name


@pytest.fixture(scope="module", params=CHECKPOINTS)
def loaded(request, fixtures_dir):
    path = _path(fixtures_dir, request.param)
    model, processor = load_pretrained(path)
    golden = fixtures_dir / "tiny_mha-seed1.golden.npz"  # conversations and images: any fixture's do
    cases = load_cases(golden)
    preps = {c: processor.prepare(g["conversation"], g["images"]) for c, g in cases.items()}
    return request.param, model, processor, preps


def oracle(model, processor, prep, p: SamplingParams, eos=None) -> list[int]:
    eos = processor.eos_id if eos is None else eos
    out = model.generate(processor.collate([prep]), max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                         top_p=p.top_p, repetition_penalty=p.repetition_penalty, seed=p.seed,
                         eos_token_id=eos)[0].tolist()
    return out[: out.index(eos)] if eos in out else out


def workload(preps):
    """Every fixture case (text only, 1, 2 and 3 images, 51 to 1444 prompt tokens) with each params set."""
    items = []
    for i, prep in enumerate(preps.values()):
        for j, p in enumerate(PARAMS):
            if (i + j) % 2 == 0:  # half of the grid keeps the test short; every case and params set appear
                items.append((prep, p))
    return items


def test_mixed_workload_equals_generate_alone(loaded):
    name, model, processor, preps = loaded
    items = workload(preps)
    lengths = {len(p) for p, _ in items}
    assert len(lengths) == 5 and min(lengths) < 60 and max(lengths) > 1400
    want = [oracle(model, processor, prep, p) for prep, p in items]
    # a small step budget: long prompts are prefilled in chunks, mixed with other requests' decode steps;
    # decode attention in place (CPU default), over gathered blocks (the CUDA path), and decode-only steps
    # at the bucketed shapes CUDA graphs replay (run eagerly here; batches padded up to 1, 2, 4 or 8)
    for opts in ({"in_place_decode": True}, {"in_place_decode": False}, {"static_decode": True},
                 {"static_decode": True, "in_place_decode": False}):
        engine = Engine(model, processor, kv_cache_tokens=16384, max_step_tokens=256, max_seqs=8, **opts)
        results = engine.generate([p for p, _ in items], [p for _, p in items])
        check_results(name, items, results, want)
        assert engine.stats["steps"] > 0 and engine.blocks.free == engine.usable_blocks  # every block returned
        if "static_decode" in opts:
            assert engine.stats["static_decode_steps"] > 0 and engine.stats["static_decode_padded_rows"] > 0
            if "in_place_decode" in opts:
                assert engine.stats["static_decode_in_place_steps"] == 0
            assert engine.usable_blocks == engine.plan.num_blocks - 1  # the scratch block
        else:
            assert engine.static is None and engine.usable_blocks == engine.plan.num_blocks


def check_results(name, items, results, want):
    for (prep, p), r, w in zip(items, results, want):
        assert r.finish_reason in ("length", "eos") and r.error is None
        assert r.tokens == w, (name, len(prep), p)
        assert r.finish_reason == ("length" if len(w) == p.max_new_tokens else "eos")
        assert r.prompt_tokens == len(prep)


def test_requests_submitted_while_others_decode(loaded):
    name, model, processor, preps = loaded
    first = [(preps["text_only"], SamplingParams(max_new_tokens=30)),
             (preps["grounding_ref"], SamplingParams(max_new_tokens=20, temperature=0.9, seed=3))]
    later = [(preps["two_images_tiled"], SamplingParams(max_new_tokens=8)),
             (preps["three_images_untiled"], SamplingParams(max_new_tokens=6, temperature=0.5, seed=11)),
             (preps["text_only"], SamplingParams(max_new_tokens=5, repetition_penalty=1.5))]
    engine = Engine(model, processor, kv_cache_tokens=8192, max_step_tokens=512).start()
    try:
        futs = [engine.submit(p, sp) for p, sp in first]
        deadline = time.time() + 60
        while engine.stats["decode_tokens"] < 4 and time.time() < deadline:
            time.sleep(0.005)
        assert engine.stats["decode_tokens"] >= 4 and not all(f.done() for f in futs)
        results = {}

        def submit_from_thread(k, prep, sp):  # submission is thread-safe
            results[k] = engine.submit(prep, sp)

        threads = [threading.Thread(target=submit_from_thread, args=(k, p, sp)) for k, (p, sp) in enumerate(later)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        futs += [results[k] for k in range(len(later))]
        got = [f.result(timeout=120) for f in futs]
    finally:
        engine.close()
    for (prep, sp), r in zip(first + later, got):
        assert r.tokens == oracle(model, processor, prep, sp), (name, len(prep), sp)


def test_too_long_request_errors_and_others_finish(loaded):
    name, model, processor, preps = loaded
    engine = Engine(model, processor, kv_cache_tokens=4096, max_step_tokens=512)
    ok = SamplingParams(max_new_tokens=4)
    too_long = SamplingParams(max_new_tokens=4096)  # prompt + 4096 > the 4096-token context
    over_cache = SamplingParams(max_new_tokens=3000)  # 51 + 3000 fits the context, not a 512-token cache
    prep = preps["two_images_tiled"]
    res = engine.generate([preps["text_only"], prep, preps["text_only"]], [ok, too_long, ok])
    assert res[1].finish_reason == "error" and res[1].tokens == []
    assert "exceeds the model's context of 4096 tokens" in res[1].error and str(len(prep)) in res[1].error
    assert res[0].tokens == res[2].tokens == oracle(model, processor, preps["text_only"], ok)
    small = Engine(model, processor, kv_cache_tokens=512, max_step_tokens=256)
    r = small.generate([preps["text_only"]], [over_cache])[0]
    assert r.finish_reason == "error" and "exceeds the KV cache of 512 tokens" in r.error


def test_small_cache_forces_queueing_with_same_tokens(loaded):
    name, model, processor, preps = loaded
    items = [(preps[c], SamplingParams(max_new_tokens=6)) for c in ("two_images_tiled", "grounding_ref", "text_only",
                                                                   "three_images_untiled")]
    # room for one long request at a time: the others wait in the queue until blocks are freed
    engine = Engine(model, processor, kv_cache_tokens=1500, block_size=16, max_step_tokens=400)
    peak = []
    orig = engine._run

    def spy(chunks, decoding):
        peak.append(len(engine._running))
        return orig(chunks, decoding)

    engine._run = spy
    res = engine.generate([p for p, _ in items], [p for _, p in items])
    assert max(peak) < len(items)  # never all admitted at once
    for (prep, p), r in zip(items, res):
        assert r.tokens == oracle(model, processor, prep, p)
        assert r.queue_ms >= 0 and r.total_ms >= r.queue_ms


def test_eos_ends_a_request(loaded):
    name, model, processor, preps = loaded
    prep, p = preps["grounding_ref"], SamplingParams(max_new_tokens=12)
    free_run = oracle(model, processor, prep, p)
    stop = free_run[3]  # pretend the 4th generated token is EOS
    engine = Engine(model, processor, kv_cache_tokens=4096)
    engine.eos = stop
    r = engine.generate([prep], p)[0]
    assert r.finish_reason == "eos"
    assert r.tokens == oracle(model, processor, prep, p, eos=stop) == free_run[: free_run.index(stop)]
    ignored = engine.generate([prep], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    assert ignored.finish_reason == "length" and ignored.tokens == free_run


def test_seed_does_not_depend_on_the_batch(fixtures_dir):
    model, processor = load_pretrained(fixtures_dir / "tiny_mha-seed1")
    cases = load_cases(fixtures_dir / "tiny_mha-seed1.golden.npz")
    prep = processor.prepare(cases["text_only"]["conversation"], [])
    sp = SamplingParams(max_new_tokens=16, temperature=1.5, seed=42)
    alone = Engine(model, processor, kv_cache_tokens=4096).generate([prep], sp)[0].tokens
    crowd = Engine(model, processor, kv_cache_tokens=8192).generate(
        [prep] * 3, [SamplingParams(max_new_tokens=16, temperature=1.5, seed=s) for s in (1, 42, 2)])
    assert crowd[1].tokens == alone
    assert crowd[0].tokens != alone or crowd[2].tokens != alone  # other seeds draw differently


def test_counter_based_draws_are_uniform_and_sample_the_distribution():
    """The draws a request's seed gives: in [0, 1), spread evenly over seeds and over steps, and through
    `draw` they pick each token as often as its probability (never one of probability 0)."""
    us = [uniform(seed, step) for seed in range(200) for step in range(50)]
    assert all(0.0 <= u < 1.0 for u in us) and len(set(us)) == len(us)
    counts = torch.histc(torch.tensor(us), bins=10, min=0.0, max=1.0)
    assert counts.min() > 0.9 * len(us) / 10 and counts.max() < 1.1 * len(us) / 10  # 1,000 +- ~30 expected
    assert uniform(7, 3) == uniform(7, 3) != uniform(8, 3) != uniform(7, 4)
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05, 0.0])
    n = 20000
    got = draw(probs.expand(n, -1), torch.tensor([uniform(s, 0) for s in range(n)], dtype=torch.float64))
    freq = torch.bincount(got, minlength=6).double() / n
    assert freq[1] == freq[5] == 0
    assert torch.allclose(freq, probs.double(), atol=0.012), freq  # ~4 standard errors at p = 0.5
    # a draw at the top of [0, 1) stays inside the support; unnormalised rows are scaled by their total
    assert draw(torch.tensor([[0.2, 0.8, 0.0]]), torch.tensor([1 - 2**-53], dtype=torch.float64)).item() == 1
    assert draw(torch.tensor([[2.0, 6.0]]), torch.tensor([0.24], dtype=torch.float64)).item() == 0


def test_a_steps_sampled_rows_draw_in_one_call_and_each_row_as_if_alone():
    """`sample` on a batch of rows with their own temperatures and draws gives each row what it gives
    alone, and the greedy rows their argmax."""
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    params = [SamplingParams(temperature=t, top_p=p) for t, p in
              [(0.0, 1.0), (0.7, 1.0), (1.3, 0.9), (0.0, 1.0), (1.0, 0.5), (0.4, 0.95)]]
    draws = [None if p.greedy else uniform(i, 5) for i, p in enumerate(params)]
    together = sample(logits, params, draws, None)
    alone = [int(sample(logits[i : i + 1], [p], [d], None)) for i, (p, d) in enumerate(zip(params, draws))]
    assert together.tolist() == alone
    assert together[0] == logits[0].argmax() and together[3] == logits[3].argmax()


def test_a_generate_batch_row_samples_as_the_engine_request_seeded_seed_plus_its_row(fixtures_dir):
    model, processor = load_pretrained(fixtures_dir / "tiny_mha-seed1")
    cases = load_cases(fixtures_dir / "tiny_mha-seed1.golden.npz")
    preps = [processor.prepare(cases[c]["conversation"], cases[c]["images"]) for c in ("text_only", "text_only")]
    batch = model.generate(processor.collate(preps), max_new_tokens=10, temperature=1.4, seed=20, eos_token_id=-1)
    engine = Engine(model, processor, kv_cache_tokens=8192)
    rows = engine.generate(preps, [SamplingParams(max_new_tokens=10, temperature=1.4, seed=s, ignore_eos=True)
                                   for s in (20, 21)])
    assert [r.tokens for r in rows] == batch.tolist()
    assert rows[0].tokens != rows[1].tokens  # the same prompt, two seeds


def test_no_repeat_ngram_guard(fixtures_dir):
    sp = SamplingParams(no_repeat_ngram_size=3, no_repeat_window=6)
    assert banned_by_ngram([5, 6, 7, 5, 6], sp) == [7]  # 5 6 -> 7 was seen: ban 7
    assert banned_by_ngram([5, 6, 7, 1, 2, 3, 4, 5, 6], sp) == []  # out of the window
    assert banned_by_ngram([5, 6, 7, 5, 6], sp.model_copy(update={"no_repeat_whitelist": (7,)})) == []
    model, processor = load_pretrained(fixtures_dir / "tiny_mha-seed1")
    cases = load_cases(fixtures_dir / "tiny_mha-seed1.golden.npz")
    prep = processor.prepare(cases["two_images_tiled"]["conversation"], cases["two_images_tiled"]["images"])
    free = Engine(model, processor, kv_cache_tokens=4096).generate([prep], SamplingParams(max_new_tokens=16))[0]
    assert free.tokens[:4] == [85, 85, 85, 85]  # this random model loops on one token
    guarded = Engine(model, processor, kv_cache_tokens=4096).generate(
        [prep], SamplingParams(max_new_tokens=16, no_repeat_ngram_size=2))[0]
    pairs = list(zip(guarded.tokens, guarded.tokens[1:]))
    assert len(pairs) == len(set(pairs)) and guarded.guard_bans > 0  # no bigram repeats


def test_incremental_ngram_guard_matches_the_scan():
    """The engine's per-request guard (an index of the window's n-grams, kept up to date) bans what a
    scan of the window bans, at every length, also when it is asked only every few tokens."""
    rng = random.Random(0)
    for _ in range(600):
        n, window = rng.choice([1, 2, 3, 4, 6]), rng.choice([0, 1, 2, 3, 5, 6, 8, 20])
        vocab = rng.choice([2, 3, 5])
        params = SamplingParams(no_repeat_ngram_size=n, no_repeat_window=window,
                                no_repeat_whitelist=tuple(rng.sample(range(vocab), rng.choice([0, 1]))))
        guard, tokens, every = NgramGuard(params), [], rng.choice([1, 1, 2, 3])
        for i in range(50):
            if i % every == 0:
                assert guard.banned(tokens) == banned_by_ngram(tokens, params), (params, tokens)
            tokens.append(rng.randrange(vocab))


def test_grouped_expert_kernel_matches_loop(fixtures_dir):
    """The host-sync-free grouped path (bf16 CUDA's) gives the per-expert loop's results."""
    torch.manual_seed(0)
    e = Experts(6, 32, 16)
    for p in e.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(40, 32)
    idx = torch.randint(0, 6, (40, 2))
    idx[:, 1] = (idx[:, 0] + 1) % 6
    idx[idx == 3] = 4  # expert 3 gets no token
    w = torch.rand(40, 2)
    try:
        e.grouped = False
        a = e(x, idx, w)
        e.grouped = True
        b = e(x, idx, w)
    finally:
        e.grouped = None
    assert (a - b).abs().max().item() < 1e-5
    # auto on CPU float32 (torch 2.13 has the kernel): grouped for several tokens on small experts, the
    # loop for one token (it is faster there) and once each expert's share of the call is large
    from model.language import _cpu_grouped_mm
    assert _cpu_grouped_mm() and e._use_grouped(x, 80) and not e._use_grouped(x[:1], 2)
    big = Experts(2, 1024, 1024)
    assert not big._use_grouped(torch.zeros(8, 1024), 16)


def test_grouped_expert_calls_pass_torchs_checks_at_the_released_shapes():
    """The bf16 CUDA path's `torch._grouped_mm` calls, run on the meta device: torch's own shape, dtype,
    stride and 16-byte alignment checks (the ones the CUDA kernel applies) pass for the layouts the
    experts hand it at tiny's, small's and base's real expert shapes, with no GPU here. Passes on torch
    2.13 and on 2.11 (the device image's; checked 2026-12-02)."""
    from model.presets import make_config

    for variant in ("tiny", "small", "base"):
        lc = make_config(variant, "full")["language_config"]
        hidden, inner, num, k = (lc["hidden_size"], lc["moe_intermediate_size"], lc["n_routed_experts"],
                                 lc["num_experts_per_tok"])
        e = Experts(num, hidden, inner).to(device="meta", dtype=torch.bfloat16)
        e.grouped = True
        for n in (1, 37, 512):
            x = torch.empty(n, hidden, device="meta", dtype=torch.bfloat16)
            idx = torch.empty(n, k, device="meta", dtype=torch.int64)
            y = e(x, idx, torch.empty(n, k, device="meta"))
            assert y.shape == (n, hidden) and y.dtype == torch.bfloat16, variant
        # the checks are live on meta: tokens whose rows are not 16-byte aligned are refused
        skewed = torch.empty(8, hidden + 1, device="meta", dtype=torch.bfloat16)[:, 1:]
        with pytest.raises(RuntimeError, match="multiple of 16 bytes"):
            torch._grouped_mm(skewed, e.joined().transpose(1, 2),
                              offs=torch.empty(num, device="meta", dtype=torch.int32))


def test_continued_chunk_in_two_parts_matches_the_masked_call():
    """A prompt chunk after a cached prefix: two mask-free flash calls joined by their log-sum-exps give
    the lower-right causal masked call's output (MHA, and GQA where heads share keys)."""
    from model.config import LanguageConfig
    from model.language import MHAttention
    from model.runner import continuation_mask

    torch.manual_seed(0)
    for heads, kv_heads in [(4, 4), (4, 2)]:
        cfg = LanguageConfig(hidden_size=64, num_attention_heads=heads, num_key_value_heads=kv_heads,
                             intermediate_size=128, num_hidden_layers=1, vocab_size=32)
        attn = MHAttention(cfg)
        assert attn.continued_in_two(torch.device("cpu"), torch.float32)
        assert not attn.continued_in_two(torch.device("cpu"), torch.bfloat16)
        for start, n in [(1, 5), (37, 100), (300, 64)]:
            q = torch.randn(1, heads, n, 16)
            k, v = torch.randn(2, 1, kv_heads, start + n, 16).unbind(0)
            masked = attn.core(q, k, v, mask=continuation_mask(start, n, q.device))
            two = attn.core_continued(q, k, v)
            assert two.shape == masked.shape == (1, n, heads * 16)
            assert (two - masked).abs().max().item() < 1e-5
            # the parts matter: dropping the prefix, or letting the chunk see its future, changes the output
            assert (attn.core(q, k[:, :, start:], v[:, :, start:], is_causal=True) - masked).abs().max() > 1e-3


def test_memory_plan(fixtures_dir):
    model, processor = load_pretrained(fixtures_dir / "small_mla-seed1")
    moe = next(layer.mlp for layer in model.language.model.layers if hasattr(layer.mlp, "experts"))
    assert "_joined" not in moe.experts.__dict__
    engine = Engine(model, processor, memory_budget_bytes=2**20, block_size=16)
    # the products are joined before the plan (joining moves weights), not at the first step
    assert moe.experts.gate_proj.data_ptr() == moe.experts.__dict__["_joined"]["gate_up"].data_ptr()
    assert moe.shared_experts.gate_proj.weight.data_ptr() == moe.shared_experts.__dict__["_joined"]["gate_up"].data_ptr()
    cfg = model.cfg.language_config
    per_token = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4  # MLA: latent + rope key
    assert engine.plan.bytes_per_token == per_token
    assert engine.plan.num_blocks == 2**20 // (per_token * 16)
    assert engine.cache.layers[0][0].shape == (engine.plan.num_blocks * 16, cfg.kv_lora_rank)  # [slots, rank]
    auto = Engine(model, processor)  # planned from the host's available memory
    assert auto.plan.tokens >= 4096 and auto.plan.max_step_tokens >= auto.plan.max_seqs


def test_fragmented_cache_gives_the_same_tokens(fixtures_dir):
    """Reservations are contiguous runs when the pool has one (attention reads them in place); in a
    fragmented pool a reservation takes scattered blocks and attention gathers them: same tokens."""
    from model.kv_cache import BlockAllocator, contiguous

    a = BlockAllocator(10)
    first, second = a.allocate(4), a.allocate(3)
    assert first == [0, 1, 2, 3] and second == [4, 5, 6] and contiguous(first)
    a.release(first)
    assert a.allocate(5) == [0, 1, 2, 3, 7]  # no free run of 5: scattered
    model, processor = load_pretrained(fixtures_dir / "small_mla-seed1")
    cases = load_cases(fixtures_dir / "small_mla-seed1.golden.npz")
    prep = processor.prepare(cases["grounding_ref"]["conversation"], cases["grounding_ref"]["images"])
    sp = SamplingParams(max_new_tokens=8)
    engine = Engine(model, processor, kv_cache_tokens=16 * 400, block_size=16, max_step_tokens=512)
    hold = engine.blocks.allocate(engine.plan.num_blocks)
    engine.blocks.release(hold[::2])  # every other block free: no run of two
    scattered = engine.blocks.free
    r = engine.generate([prep], sp)[0]
    assert engine.stats["steps"] > 1 and engine.blocks.free == scattered
    assert r.tokens == oracle(model, processor, prep, sp)


def test_strided_runs_and_views():
    """Evenly spaced contiguous reservations are read as one strided view; the view equals a gather."""
    from model.kv_cache import PagedKVCache
    from model.runner import strided_runs

    assert strided_runs([0, 100, 200, 350, 500], [90, 90, 90, 90, 90]) == [[0, 1, 2], [3, 4]]
    assert strided_runs([200, 0, 100], [50, 60, 55]) == [[1, 2, 0]]  # sorted by start
    assert strided_runs([0, 100, 200], [100, 90, 20]) == [[0, 1], [2]]  # the padding rule splits
    # the pool's end: a run's last row (last start + its longest length) must stay within `limit`
    assert strided_runs([0, 100, 200], [90, 90, 95], limit=290) == [[0, 1], [2]]
    assert strided_runs([0, 100, 200], [90, 90, 95], limit=300) == [[0, 1, 2]]
    cache = PagedKVCache([((2, 3), (5,))], num_blocks=12, block_size=4, device=torch.device("cpu"),
                         dtype=torch.float32)
    assert cache.layers[0][0].shape == (2, 48, 3) and cache.layers[0][1].shape == (48, 5)  # head-major
    slots = torch.arange(48)
    cache.write(0, slots, (torch.randn(48, 2, 3), torch.randn(48, 5)))
    k, lat = cache.strided(0, start=8, stride=12, count=3, length=10)
    gk, glat = cache.gather(0, torch.tensor([[2, 3, 4], [5, 6, 7], [8, 9, 10]]))
    assert torch.equal(k, gk[:, :10]) and torch.equal(lat, glat[:, :10])
    assert torch.equal(cache.view(0, 20, 7)[0], gk[1:2, :7])
    with pytest.raises(IndexError):
        cache.strided(0, start=8, stride=12, count=4, length=10)  # the last row would run past the pool


def test_equal_reservations_decode_as_one_strided_run(fixtures_dir, monkeypatch):
    model, processor = load_pretrained(fixtures_dir / "tiny_mha-seed1")
    cases = load_cases(fixtures_dir / "tiny_mha-seed1.golden.npz")
    preps = {c: processor.prepare(g["conversation"], g["images"]) for c, g in cases.items()}
    items = [(preps["text_only"], SamplingParams(max_new_tokens=12, temperature=0.9, seed=s)) for s in range(4)]
    items += [(preps["grounding_ref"], SamplingParams(max_new_tokens=6))]  # another length, same granule
    engine = Engine(model, processor, kv_cache_tokens=16384, max_step_tokens=1024)
    import model.engine as engine_module
    runs = []  # the in-place runs' rows of each decode-only step
    step_fn = engine_module.forward_step

    def spy(language, step, cache):
        if not step.prefills:
            runs.append([d.rows for d in step.in_place])
        return step_fn(language, step, cache)

    monkeypatch.setattr(engine_module, "forward_step", spy)
    results = engine.generate([p for p, _ in items], [p for _, p in items])
    for (prep, p), r in zip(items, results):
        assert r.tokens == oracle(model, processor, prep, p)
    # 5 decode tokens per step read in place by fewer SDPA runs than tokens
    assert engine.stats["in_place_tokens"] >= 2 * engine.stats["in_place_runs"] > 0
    # rows go in slot order, so a run's rows are a slice (no index, no scatter); once the longer prompt is
    # done, one run covers every row of the step
    assert runs and all(isinstance(r, slice) for step in runs for r in step)
    assert [slice(0, 4), slice(4, 5)] in runs and [slice(0, 4)] in runs


def test_a_prompt_that_fits_a_step_is_prefilled_whole(fixtures_dir, monkeypatch):
    """A prompt no longer than the step budget is never split (it waits for a step it fits whole, so its
    attention is one causal call); one longer than the budget is split, starting a step; tokens as alone."""
    model, processor = load_pretrained(fixtures_dir / "tiny_mha-seed1")
    cases = load_cases(fixtures_dir / "tiny_mha-seed1.golden.npz")
    preps = {c: processor.prepare(g["conversation"], g["images"]) for c, g in cases.items()}
    names = ["grounding_ref", "two_images_tiled", "text_only", "three_images_untiled", "single_1000x400_rgba",
             "grounding_ref"]
    budget = 1400  # holds every prompt but the 1,444-token one, and no two of the long ones together
    engine = Engine(model, processor, kv_cache_tokens=16384, max_step_tokens=budget)
    seen: list[list[tuple[int, int, int]]] = []  # per step: (request, first token, tokens) of each chunk
    run = engine._run

    def spy(chunks, decoding):
        seen.append([(s.id, s.cached, n) for s, n in chunks])
        return run(chunks, decoding)

    monkeypatch.setattr(engine, "_run", spy)
    p = SamplingParams(max_new_tokens=5)
    results = engine.generate([preps[n] for n in names], p)
    for n, r in zip(names, results):
        assert r.tokens == oracle(model, processor, preps[n], p)
    pieces: dict[int, list[tuple[int, int, int]]] = {}
    for i, step in enumerate(seen):
        for k, (rid, start, n) in enumerate(step):
            pieces.setdefault(rid, []).append((i, k, start, n))
    lengths = {i: len(preps[n]) for i, n in enumerate(names)}
    for rid, chunks in pieces.items():
        if lengths[rid] <= budget - 16:  # fits a step beside the decode tokens: one chunk
            assert [(c[2], c[3]) for c in chunks] == [(0, lengths[rid])], (rid, chunks)
        else:  # split, its first chunk first in its step
            assert len(chunks) == 2 and chunks[0][1] == 0 and chunks[0][2] == 0, (rid, chunks)
    assert any(len(step) > 1 for step in seen)  # short prompts still share steps


def test_pixel_tiles_are_normalized_on_the_device_with_the_same_bits(loaded):
    """uint8 tiles (`unpack(pixels=True)`, what the pipeline's model stage submits) give the float tiles'
    image rows bit for bit, the same tokens, and the same `collate` for `model.generate`."""
    from model.engine import image_rows

    name, model, processor, preps = loaded
    floats = [p for p in preps.values() if p.images_spatial_crop[0, 0] > 0]
    pixels = [processor.unpack(processor.pack(p), pixels=True) for p in floats]
    assert floats and all(p.images.dtype == torch.uint8 for p in pixels)
    assert torch.equal(processor.unpack(processor.pack(pixels[0]), pixels=True).images, pixels[0].images)
    with torch.inference_mode():
        for a, b in zip(image_rows(model, floats), image_rows(model, pixels, processor)):
            assert torch.equal(a, b)
        with pytest.raises(ValueError, match="need the processor"):
            image_rows(model, pixels[:1])
    assert torch.equal(processor.collate(pixels).images, processor.collate(floats).images)
    params = SamplingParams(max_new_tokens=4)
    want = [r.tokens for r in Engine(model, processor).generate(floats, params)]
    assert [r.tokens for r in Engine(model, processor).generate(pixels, params)] == want


def test_given_image_rows_of_the_wrong_count_fail_only_their_request(fixtures_dir):
    """Image rows from a vision worker are placed at the prompt's placeholders, found on the host; rows that
    do not match their count fail that request with both numbers, and the others finish as usual."""
    from model.engine import image_rows

    model, processor = load_pretrained(fixtures_dir / "tiny_mha-seed1")
    cases = load_cases(fixtures_dir / "tiny_mha-seed1.golden.npz")
    preps = [processor.prepare(g["conversation"], g["images"]) for g in cases.values()]
    prep = next(p for p in preps if p.images_spatial_crop[0, 0] > 0)
    with torch.inference_mode():
        rows = image_rows(model, [prep])[0]
    need = int(prep.images_seq_mask.sum())
    assert rows.shape[0] == need
    params = SamplingParams(max_new_tokens=4)
    engine = Engine(model, processor)
    good = engine.submit(prep, params, image_rows=rows)
    bad = engine.submit(prep, params, image_rows=rows[:-3])
    alone = engine.submit(prep, params)
    while engine.has_work():
        engine.step()
    assert good.result().tokens == alone.result().tokens == oracle(model, processor, prep, params)
    res = bad.result()
    assert res.finish_reason == "error"
    assert f"{need} image placeholders but {need - 3} image rows" in res.error


def test_step_returns_the_tokens_it_processed(fixtures_dir):
    """`Engine.step()` (the incremental API) returns the prompt and decode tokens its pass processed, on the
    packed and the bucketed path: split prompts, then one fed token per generated token but the last."""
    model, processor = load_pretrained(fixtures_dir / "tiny_mha-seed1")
    cases = load_cases(fixtures_dir / "tiny_mha-seed1.golden.npz")
    preps = [processor.prepare(cases[c]["conversation"], cases[c]["images"]) for c in ("text_only", "grounding_ref")]
    for static in (False, True):
        engine = Engine(model, processor, max_step_tokens=64, static_decode=static)
        for p in preps:
            engine.submit(p, SamplingParams(max_new_tokens=5, ignore_eos=True))
        counts = []
        while engine.has_work():
            before = engine.stats["prefill_tokens"] + engine.stats["decode_tokens"]
            counts.append(engine.step())
            assert counts[-1] == engine.stats["prefill_tokens"] + engine.stats["decode_tokens"] - before
        assert sum(counts) == sum(len(p) for p in preps) + len(preps) * 4
        assert len(counts) > sum(len(p) for p in preps) // 64  # the prompts were split across steps
        assert bool(engine.stats["static_decode_steps"]) == static


def test_cuda_graph_failure_falls_back_to_eager_steps(fixtures_dir):
    """A capture that fails (here: no CUDA at all) turns graphs off with its reason and the step still
    runs, eagerly, with the same tokens; asking for graphs on a CPU model is an error."""
    model, processor = load_pretrained(fixtures_dir / "tiny_mha-seed1")
    cases = load_cases(fixtures_dir / "tiny_mha-seed1.golden.npz")
    preps = [processor.prepare(cases[c]["conversation"], cases[c]["images"]) for c in ("text_only", "grounding_ref")]
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        Engine(model, processor, kv_cache_tokens=4096, cuda_graphs=True)
    engine = Engine(model, processor, kv_cache_tokens=4096, static_decode=True)
    engine.static.use_graphs = True  # as on CUDA: the first decode-only step tries to capture
    p = SamplingParams(max_new_tokens=6)
    got = engine.generate(preps, p)
    assert [r.tokens for r in got] == [oracle(model, processor, prep, p) for prep in preps]
    assert engine.stats["cuda_graph_fallbacks"] == 1 and not engine.static.use_graphs
    assert "batch 2" in engine.static.fallback and engine.stats["cuda_graph_captures"] == 0
    assert engine.stats["static_decode_steps"] >= 4  # the later steps ran eagerly at the bucketed shapes
    # graphs wanted but not the bucketed steps themselves (CUDA's default): after the fallback, packed steps
    engine = Engine(model, processor, kv_cache_tokens=4096, static_decode=True)
    engine.static.use_graphs, engine._static_eager = True, False
    got = engine.generate(preps, p)
    assert [r.tokens for r in got] == [oracle(model, processor, prep, p) for prep in preps]
    assert engine.stats["cuda_graph_fallbacks"] == 1 and engine.stats["static_decode_steps"] == 1


@pytest.mark.parametrize("stale", [False, True])
def test_cuda_graph_bookkeeping_with_a_stand_in_graph(fixtures_dir, monkeypatch, stale):
    """The capture / replay / check logic of model.decode_graphs on CPU, with a stand-in for a CUDA graph
    that reruns the step (or, `stale`, replays the logits it saw at capture, as a graph that kept an old
    input would): graphs are captured per bucket and replayed with the same tokens as `generate`; a stale
    graph is caught at its first replay on new inputs and graphs are turned off, tokens still right."""
    import model.decode_graphs as dg

    model, processor = load_pretrained(fixtures_dir / "tiny_mha-seed1")
    cases = load_cases(fixtures_dir / "tiny_mha-seed1.golden.npz")
    preps = [processor.prepare(cases[c]["conversation"], cases[c]["images"])
             for c in ("text_only", "grounding_ref", "two_images_tiled")]
    params = [SamplingParams(max_new_tokens=n) for n in (5, 8, 12)]
    engine = Engine(model, processor, kv_cache_tokens=8192, static_decode=True)

    def stand_in(fn, device, pool):
        fn()  # the warm-up
        frozen = engine.static.logits.clone()

        class Graph:
            def replay(self):
                engine.static.logits.copy_(frozen) if stale else fn()
        return Graph(), "pool"

    monkeypatch.setattr(dg, "capture", stand_in)
    engine.static.use_graphs = True
    got = engine.generate(preps, params)
    assert [r.tokens for r in got] == [oracle(model, processor, p, sp) for p, sp in zip(preps, params)]
    if stale:
        assert engine.stats["cuda_graph_fallbacks"] == 1 and "differs from the eager step" in engine.static.fallback
        assert not engine.static.use_graphs and not engine.static.graphs
    else:
        assert engine.stats["cuda_graph_fallbacks"] == 0 and engine.static.use_graphs
        assert engine.stats["cuda_graph_captures"] == len(engine.static.graphs) >= 2  # batch buckets 4, 2, 1
        assert engine.stats["cuda_graph_replays"] > engine.stats["cuda_graph_captures"]
        assert engine.stats["cuda_graph_capture_ms"] >= 0 and "cuda_graph_capture_ms" in engine.stats
        assert engine.static.checked and engine.static.checked <= set(engine.static.graphs)  # first replays checked


@pytest.mark.parametrize("checkpoint", ["tiny_mha-seed1", "small_mla-seed1"])
def test_bucketed_steps_read_an_evenly_spaced_run_in_place(fixtures_dir, monkeypatch, checkpoint):
    """Requests admitted together with equal reservations lie side by side: the bucketed decode steps then
    read the pool in place along that run (rows in slot order), a graph per layout, and once finished
    sequences leave gaps in the run they gather instead; the tokens are generate's throughout."""
    import model.decode_graphs as dg

    model, processor = load_pretrained(fixtures_dir / checkpoint)
    cases = load_cases(fixtures_dir / "tiny_mha-seed1.golden.npz")
    prep = processor.prepare(cases["grounding_ref"]["conversation"], cases["grounding_ref"]["images"])
    # same prompt, reservations of one granule each; the second request stops first and leaves a gap
    params = [SamplingParams(max_new_tokens=n, temperature=t, seed=s)
              for n, t, s in ((9, 0.0, None), (3, 0.0, None), (9, 0.8, 4), (7, 0.0, None), (9, 1.1, 9))]
    engine = Engine(model, processor, kv_cache_tokens=8192, max_step_tokens=4096, static_decode=True)  # one prefill step
    keys = []

    def stand_in(fn, device, pool):
        fn()

        class Graph:
            def replay(self):
                fn()
        return Graph(), "pool"

    monkeypatch.setattr(dg, "capture", stand_in)
    orig = engine.static._capture
    engine.static._capture = lambda key: (keys.append(key), orig(key))[1]
    engine.static.use_graphs = True
    got = engine.generate([prep] * 5, params)
    assert [r.tokens for r in got] == [oracle(model, processor, prep, p) for p in params]
    runs = {k[2] for k in keys if k[2] is not None}
    reservation = engine._reservation(engine._queue[0] if engine._queue else _probe(engine, prep, params[0]))
    # side by side (stride = one reservation), and after the gaps rows 0, 2, 4 (stride = two)
    assert {stride for _, stride in runs} == {reservation * engine.block_size, 2 * reservation * engine.block_size}
    assert engine.stats["static_decode_in_place_steps"] > 0
    assert engine.stats["static_decode_steps"] > engine.stats["static_decode_in_place_steps"]  # the gap: gathered
    assert any(k[2] is None for k in keys) and engine.stats["cuda_graph_fallbacks"] == 0


def _probe(engine, prep, params):
    """A queued-request stand-in, for the engine's reservation arithmetic."""
    from model.engine import _Sequence
    return _Sequence(-1, prep, params, None, 0.0, len(prep))
