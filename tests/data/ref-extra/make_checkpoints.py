"""Regenerate the four extra random-weight checkpoints in this folder (official DeepSeek-VL2 layout).

    cd /work/main && .venv/bin/python tests/data/ref-extra/make_checkpoints.py

Uses only pagemill's smoke writer helpers (model.presets.make_config, model.smoke.*): make_config() gives
the language config of a variant's mini preset plus overrides; the vision tower is then shrunk to width 32
(the smoke presets only make widths 64/96), so the weights are written here with the writer's own
checkpoint_shapes / init_tensor / tokenizer helpers, exactly as write_smoke_checkpoint does.  Deterministic.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from model.smoke import smoke_config, write_checkpoint  # noqa: E402

SEED = 3
_COMMON = dict(hidden_size=48, intermediate_size=96, moe_intermediate_size=16, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
               qk_rope_head_dim=8, v_head_dim=16, vocab_size=384)

CHECKPOINTS = {
    # (a) DeepSeek-V2-style group-limited greedy routing: softmax scores, best 2 of 4 groups by group max,
    #     top-4 of the 8 experts left; norm_topk_prob false with routed_scaling_factor 2.5.
    "glg_softmax_mla-seed3": ("small", dict(
        _COMMON, n_routed_experts=16, num_experts_per_tok=4, topk_method="group_limited_greedy",
        scoring_func="softmax", n_group=4, topk_group=2, norm_topk_prob=False, routed_scaling_factor=2.5)),
    # (b) noaux_tc with sigmoid scores + e_score_correction_bias (random, non-zero) and real groups:
    #     best 2 of 4 groups by sum of the top-2 biased scores, then top-4; norm_topk_prob true, scale 2.0.
    "noaux_grouped_mla-seed3": ("base", dict(
        _COMMON, n_routed_experts=16, num_experts_per_tok=4, topk_method="noaux_tc", scoring_func="sigmoid",
        n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.0)),
    # (c) MLA with a low-rank query (q_a_proj -> q_a_layernorm -> q_b_proj), q_lora_rank 24; greedy top-3 of 8.
    "qlora_mla-seed3": ("small", dict(
        _COMMON, q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=3, topk_method="greedy")),
    # (d) MLA with YaRN RoPE scaling (DeepSeek-V2 style values; mscale != mscale_all_dim, so both the cos/sin
    #     factor and the softmax-scale factor are in play); max_position_embeddings = factor * original, as
    #     the released V2 configs have it (the reference only uses it for its initial cos/sin cache length).
    #     Greedy softmax top-3 of 8, q_lora_rank null.
    "yarn_mla-seed3": ("small", dict(
        _COMMON, n_routed_experts=8, num_experts_per_tok=3, topk_method="greedy", max_position_embeddings=163840,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.707})),
}
VISION = {"width": 32, "heads": 4, "layers": 2}


def make_one(name: str, variant: str, overrides: dict) -> Path:
    config, tok = smoke_config(variant, "mini", language_overrides=overrides)
    config["vision_config"].update(VISION)
    config["projector_config"]["input_dim"] = VISION["width"]
    return write_checkpoint(HERE / name, config, tok, SEED)


if __name__ == "__main__":
    for name, (variant, overrides) in CHECKPOINTS.items():
        print(make_one(name, variant, overrides))
