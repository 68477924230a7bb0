"""Model options the reference fixtures do not exercise, checked against plain transcriptions of the
reference's maths, plus KV-cache consistency, sampling and dtype behaviour on smoke checkpoints."""
import json

import pytest
import torch
from PIL import Image

from model import load_pretrained
from model.config import parse_config
from model.language import Gate, MLAttention
from model.smoke import write_smoke_checkpoint

CONV = [{"role": "<|User|>", "content": "<image>\n<|grounding|>Find the boxes."}, {"role": "<|Assistant|>", "content": ""}]


def lang_cfg(**kw):
    raw = {"language_config": {"hidden_size": 32, "num_attention_heads": 4, "n_routed_experts": 16,
                               "num_experts_per_tok": 4, "moe_intermediate_size": 8, "n_shared_experts": 1,
                               "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
                               "v_head_dim": 8, **kw},
           "projector_config": {"input_dim": 32, "n_embed": 32}, "vision_config": {"width": 32}}
    return parse_config(raw).language_config


def naive_gate(cfg, weight, bias, x):
    """Token-by-token transcription of the reference MoEGate (inference path)."""
    idx_all, w_all = [], []
    weight = weight.detach()
    per = cfg.n_routed_experts // (cfg.n_group or 1)
    for row in x.float():
        logits = weight.float() @ row
        scores = logits.softmax(-1) if cfg.scoring_func == "softmax" else logits.sigmoid()
        if cfg.topk_method == "greedy":
            w, i = scores.topk(cfg.num_experts_per_tok)
        else:
            choice = scores + bias if cfg.topk_method == "noaux_tc" else scores
            groups = choice.view(cfg.n_group, per)
            gscore = groups.topk(2).values.sum(-1) if cfg.topk_method == "noaux_tc" else groups.max(-1).values
            keep = set(gscore.topk(cfg.topk_group).indices.tolist())
            masked = torch.tensor([choice[e] if e // per in keep else 0.0 for e in range(cfg.n_routed_experts)])
            i = masked.topk(cfg.num_experts_per_tok).indices
            w = scores[i]
        if cfg.num_experts_per_tok > 1 and cfg.norm_topk_prob:
            w = w / (w.sum() + 1e-20)
        w = w * cfg.routed_scaling_factor
        order = i.argsort()
        idx_all.append(i[order])
        w_all.append(w[order])
    return torch.stack(idx_all), torch.stack(w_all)


@pytest.mark.parametrize(
    "options",
    [
        {"topk_method": "greedy", "scoring_func": "softmax"},
        {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2},
        {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_group": 4, "topk_group": 2,
         "norm_topk_prob": True, "routed_scaling_factor": 2.5},
        {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_group": 1, "topk_group": 1},
    ],
)
def test_gate_matches_reference_semantics(options):
    cfg = lang_cfg(**options)
    torch.manual_seed(0)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    bias = torch.zeros(cfg.n_routed_experts)
    if cfg.topk_method == "noaux_tc":
        bias = torch.randn(cfg.n_routed_experts) * 0.3
        gate.e_score_correction_bias.data.copy_(bias)
    x = torch.randn(64, cfg.hidden_size)
    idx, w = gate(x)
    order = idx.argsort(-1)
    want_idx, want_w = naive_gate(cfg, gate.weight, bias, x)
    assert torch.equal(idx.gather(1, order), want_idx)
    assert torch.allclose(w.gather(1, order), want_w, atol=1e-6)
    if cfg.n_group and cfg.n_group > 1:  # every choice falls inside topk_group groups
        groups = (idx // (cfg.n_routed_experts // cfg.n_group))
        assert all(len(set(g.tolist())) <= cfg.topk_group for g in groups)


def naive_mla(attn: MLAttention, x: torch.Tensor) -> torch.Tensor:
    """The reference's non-absorbed formulation (full K/V per head), causal, positions 0..T-1."""
    b, t, _ = x.shape
    if hasattr(attn, "q_a_proj"):
        q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x)))
    else:
        q = attn.q_proj(x)
    q = q.view(b, t, attn.heads, -1).transpose(1, 2)
    q_nope, q_pe = q.split([attn.nope, attn.rope], -1)
    latent, k_pe = attn.kv_a_proj_with_mqa(x).split([attn.rank, attn.rope], -1)
    kv = attn.kv_b_proj(attn.kv_a_layernorm(latent)).view(b, t, attn.heads, -1).transpose(1, 2)
    k_nope, v = kv.split([attn.nope, attn.v_dim], -1)
    pos = torch.arange(t)[None].expand(b, t)
    cos, sin = attn.rotary(pos, x.dtype)

    def rope(z):  # interleaved pairs (z0,z1),(z2,z3)… rotated by frequency i
        z = z.view(*z.shape[:-1], -1, 2).transpose(-1, -2).reshape(z.shape)
        z1, z2 = z.chunk(2, -1)
        return z * cos + torch.cat([-z2, z1], -1) * sin

    k = torch.cat([k_nope, rope(k_pe[:, None]).expand(b, attn.heads, t, attn.rope)], -1)
    qq = torch.cat([q_nope, rope(q_pe)], -1)
    scores = qq @ k.transpose(-1, -2) * attn.scale
    scores = scores.masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
    y = scores.softmax(-1) @ v
    return attn.o_proj(y.transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("q_lora_rank", [None, 12])
def test_mla_absorbed_matches_full_kv(q_lora_rank):
    cfg = lang_cfg(q_lora_rank=q_lora_rank)
    torch.manual_seed(1)
    attn = MLAttention(cfg)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 9, cfg.hidden_size)
    valid = torch.ones(2, 9, dtype=torch.bool)
    mask = torch.ones(9, 9).tril().bool()[None, None] & valid[:, None, None, :]
    pos = torch.arange(9)[None].expand(2, 9)
    got = attn(x, pos, mask, None, 0)
    assert torch.allclose(got, naive_mla(attn, x), atol=1e-5)


@pytest.fixture(scope="module")
def smoke_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    cases = {
        "tiny": ("tiny", {}),
        "small": ("small", {}),
        "base": ("base", {}),
        "small_qlora_grouped": ("small", {"q_lora_rank": 24, "topk_method": "group_limited_greedy",
                                          "n_group": 4, "topk_group": 2, "n_routed_experts": 16}),
        "base_grouped": ("base", {"n_group": 3, "topk_group": 2}),
    }
    return {name: write_smoke_checkpoint(root / name, v, "mini", seed=3, language_overrides=o)
            for name, (v, o) in cases.items()}


@pytest.mark.parametrize("name", ["tiny", "small", "base", "small_qlora_grouped", "base_grouped"])
def test_cached_decode_equals_full_forward(smoke_dirs, name):
    """Each generation step's logits (KV cache) equal a cache-free forward over prompt + tokens."""
    model, processor = load_pretrained(smoke_dirs[name])
    image = Image.new("RGB", (500, 420), (20, 160, 90))
    inputs = processor(CONV, [image])
    tokens, step_logits = model.generate(inputs, max_new_tokens=5, return_logits=True, eos_token_id=-1)
    assert tokens.shape == (1, 5)
    full_ids = torch.cat([inputs.input_ids, tokens[:, :-1]], dim=1)
    extended = type(inputs)(
        input_ids=full_ids,
        attention_mask=torch.ones_like(full_ids, dtype=torch.bool),
        images_seq_mask=torch.cat([inputs.images_seq_mask, torch.zeros(1, 4, dtype=torch.bool)], 1),
        images=inputs.images,
        images_spatial_crop=inputs.images_spatial_crop,
    )
    full = model(extended)[0, inputs.input_ids.shape[1] - 1 :]
    assert (full - step_logits[0]).abs().max().item() < 1e-4


def test_sampling_options(smoke_dirs):
    model, processor = load_pretrained(smoke_dirs["small"])
    text_only = [{"role": "<|User|>", "content": "Say something long."}, {"role": "<|Assistant|>", "content": ""}]
    inputs = processor([CONV, text_only], [[Image.new("L", (300, 900), 200)], []])
    greedy = model.generate(inputs, max_new_tokens=6)
    assert greedy.shape[0] == 2 and greedy.shape[1] <= 6
    # top_p near zero keeps only the best token: sampling collapses to greedy
    assert torch.equal(model.generate(inputs, max_new_tokens=6, temperature=1.0, top_p=1e-6, seed=1), greedy)
    a = model.generate(inputs, max_new_tokens=6, temperature=5.0, seed=7)
    b = model.generate(inputs, max_new_tokens=6, temperature=5.0, seed=7)
    c = model.generate(inputs, max_new_tokens=6, temperature=5.0, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) or not torch.equal(a, greedy)
    penalised = model.generate(inputs, max_new_tokens=6, repetition_penalty=50.0)
    for row in penalised.tolist():  # a huge penalty forbids repeating any generated token
        assert len(set(row)) == len(row)
    # stop on EOS: make the first greedy token the EOS and generation ends after one step
    first = int(greedy[0, 0])
    single = processor(CONV, [Image.new("L", (300, 900), 200)])
    stopped = model.generate(single, max_new_tokens=6, eos_token_id=first)
    assert stopped.shape[1] == 1 and int(stopped[0, 0]) == first


def test_bfloat16_loads_without_float32_copy(smoke_dirs):
    model, processor = load_pretrained(smoke_dirs["base"], dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if not n.endswith("e_score_correction_bias"))
    assert any(n.endswith("e_score_correction_bias") and d == torch.float32 for n, d in dtypes.items())
    inputs = processor(CONV, [Image.new("RGB", (640, 480), "white")])
    logits = model(inputs)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    ref, _ = load_pretrained(smoke_dirs["base"])
    ref_logits = ref(inputs)
    # bf16 tracks fp32 closely on a random mini model (relative to the logit spread)
    assert (logits - ref_logits).abs().mean() < 0.05 * ref_logits.std()
    assert json.loads((smoke_dirs["base"] / "config.json").read_text())["language_config"]["topk_method"] == "noaux_tc"


def test_vision_mlp_fused_gelu_matches_the_plain_path(monkeypatch):
    """On CPU float32 the vision MLP runs fc1 and the tanh GELU as one oneDNN call; it must give what
    `fc2(gelu(fc1(x)))` gives (a real-size SigLIP width here, so the op sees the shapes it will)."""
    import model.vision as vision

    torch.manual_seed(0)
    mlp = vision.Mlp(1152, 4304)
    x = torch.randn(2, 50, 1152)
    assert vision._cpu_linear_gelu(), "this torch build lacks oneDNN's fused linear (CPU vision falls back)"
    with torch.inference_mode():
        fused = mlp(x)
        monkeypatch.setattr(vision, "_cpu_linear_gelu", lambda: False)
        plain = mlp(x)
    ref = mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x), approximate="tanh"))
    assert torch.equal(plain, ref)
    assert (fused - ref).abs().max() < 1e-5 * ref.abs().max()
    # the exact GELU would differ by more: the test tells the two approximations apart
    assert (mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x))) - ref).abs().max() > (fused - ref).abs().max()


def test_joined_weights_are_views_and_follow_reloads_and_casts():
    """`joined` gives one tensor for several parameters without holding them twice, and never a stale
    one: a copy_ into a parameter (a reload) shows in it, and a cast or a replaced parameter is joined anew.
    Exactness is checked against a fresh join of the parameters' current values (same product shape, so
    the same bits); against the separate gate and up products it is within float rounding (bitwise equal
    on torch 2.13 CPU, not on 2.11, whose gemm blocks a 12- and a 24-column product differently)."""
    from model.language import MLP, joined

    def fresh(mlp, x):  # the joined product made anew from the parameters as they are now
        w = torch.cat([mlp.gate_proj.weight.detach().clone(), mlp.up_proj.weight.detach().clone()])
        gate, up = (x @ w.T).chunk(2, dim=-1)
        return mlp.down_proj(torch.nn.functional.silu(gate) * up)

    def separate(mlp, x):
        return mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))

    torch.manual_seed(0)
    mlp = MLP(8, 12)
    x = torch.randn(5, 8)
    with torch.inference_mode():
        assert torch.equal(mlp(x), fresh(mlp, x))
        assert torch.allclose(mlp(x), separate(mlp, x), rtol=0, atol=1e-6)
    whole = mlp._joined["gate_up"]
    assert whole.shape == (24, 8) and not whole.is_inference()
    assert mlp.gate_proj.weight.data_ptr() == whole.data_ptr()
    assert mlp.up_proj.weight.data_ptr() == whole[12:].data_ptr()
    before = mlp(x).detach()
    with torch.no_grad():  # what load_weights does
        mlp.up_proj.weight.copy_(torch.randn(12, 8))
    assert torch.equal(mlp(x), fresh(mlp, x)) and not torch.allclose(mlp(x), before)
    mlp.up_proj.weight = torch.nn.Parameter(torch.randn(12, 8))  # own storage: joined anew
    ref = fresh(mlp, x)
    assert torch.equal(mlp(x), ref) and mlp._joined["gate_up"] is not whole
    assert torch.allclose(mlp(x), separate(mlp, x), rtol=0, atol=1e-6)
    mlp.to(torch.float64)
    assert joined(mlp, "gate_up", [mlp.gate_proj.weight, mlp.up_proj.weight], 0).dtype == torch.float64
    assert torch.allclose(mlp(x.double()), ref.double(), atol=1e-6)


def test_packed_projection_gives_the_bits_of_project(tmp_path):
    """The engine's one-product q/k/v projection with one rotary pass (MHA, and GQA) equals `project`."""
    from model.language import MHAttention

    for kv_heads in (4, 2):
        cfg = lang_cfg(use_mla=False, kv_lora_rank=None, num_key_value_heads=kv_heads)
        attn = MHAttention(cfg)
        for p in attn.parameters():
            torch.nn.init.normal_(p, std=0.2)
        x = torch.randn(1, 37, 32)
        pos = torch.arange(100, 137)[None]
        with torch.inference_mode():
            rope = attn.rotary(pos, x.dtype)
            q, entries = attn.project(x, pos, rope)
            k, v = attn.token_entries(entries)
            q2, (k2, v2) = attn.project_packed(x[0], rope)
        assert q2.shape == q.shape and k2.shape == k.shape == (37, kv_heads, attn.head_dim)
        assert torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(v, v2)


def test_tiles_given_as_pieces_are_chunked_without_joining_them(smoke_dirs):
    """`encode_tiles` takes each request's tiles as they are: a chunk inside one piece goes to the vision
    tower as a view of it (no copy), a chunk across pieces is joined, and the features are those of the
    joined tiles in chunks of the same size."""
    from model.model import _chunks

    model, _ = load_pretrained(smoke_dirs["tiny"])
    torch.manual_seed(0)
    pieces = [torch.randn(n, 3, 384, 384) for n in (3, 4, 2)]
    model.vision_chunk = 4
    with torch.inference_mode():
        want = torch.cat([model.projector(model.vision(t)) for t in torch.cat(pieces).split(4)])
        seen = []
        hook = model.vision.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
        got = model.encode_tiles(pieces)
        alone = model.encode_tiles(pieces[1])
        hook.remove()
    assert torch.equal(got, want)
    assert [len(t) for t in seen] == [4, 4, 1, 4]  # chunks 0-3 and 4-7 span pieces; then piece 1 alone
    assert seen[3].data_ptr() == pieces[1].data_ptr()  # one piece in one chunk: not copied
    assert torch.equal(alone, want[3:7])
    assert [len(c) for c in _chunks([torch.zeros(0, 1), torch.zeros(5, 1)], 2)] == [2, 2, 1]
