"""Regenerate the three extra random-weight checkpoints in this folder (official DeepSeek-VL2 layout).

    cd /work/main && .venv/bin/python tests/data/ref-extra/make_checkpoints.py

Uses only pagemill's smoke writer helpers (model.presets.make_config, model.smoke.*): make_config() gives
the language config of a variant's mini preset plus overrides; the vision tower is then shrunk to width 32
(the smoke presets only make widths 64/96), so the weights are written here with the writer's own
checkpoint_shapes / init_tensor / tokenizer helpers, exactly as write_smoke_checkpoint does.  Deterministic.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from safetensors.torch import save_file  # noqa: E402

import torch  # noqa: E402
from model.presets import make_config, processor_config  # noqa: E402
from model.smoke import (BOS, EOS, INDEX_NAME, _write_json, build_tokenizer, checkpoint_shapes, save_tokenizer_json,  # noqa: E402
                         init_tensor, tokenizer_files)

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
}
VISION = {"width": 32, "heads": 4, "layers": 2}


def make_one(name: str, variant: str, overrides: dict) -> Path:
    config = make_config(variant, "mini", **overrides)
    config["vision_config"].update(VISION)
    config["projector_config"]["input_dim"] = VISION["width"]
    tok = build_tokenizer(variant)
    lang = config["language_config"]
    lang["bos_token_id"], lang["eos_token_id"] = tok.token_to_id(BOS), tok.token_to_id(EOS)
    assert tok.get_vocab_size() <= lang["vocab_size"]
    out = HERE / name
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", config)
    _write_json(out / "processor_config.json", processor_config())
    save_tokenizer_json(tok, out / "tokenizer.json")
    for fname, obj in tokenizer_files(tok).items():
        _write_json(out / fname, obj, ascii_only=False)
    shapes = checkpoint_shapes(config)
    tensors = {key: init_tensor(key, shape, SEED, torch.float32) for key, shape in shapes.items()}
    shard = "model-00001-of-000001.safetensors"
    save_file(tensors, str(out / shard), metadata={"format": "pt"})
    total = sum(math.prod(s) for s in shapes.values()) * 4
    _write_json(out / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": dict.fromkeys(sorted(shapes), shard)})
    return out


if __name__ == "__main__":
    for name, (variant, overrides) in CHECKPOINTS.items():
        print(make_one(name, variant, overrides))
