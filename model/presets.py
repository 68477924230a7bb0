"""DeepSeek-VL2 variant structures as config.json dicts (official layout).

The official config.json files leave many fields to the class defaults; the presets do the same, so a
config written from here looks exactly like the released ones (and like the reference fixtures).
"mini" presets keep each variant's structural features (MHA vs MLA, routing method, scoring, gate bias)
at fixture-like sizes so they load in well under a second.
"""
from __future__ import annotations

import copy
from typing import Any

VARIANTS = ("tiny", "small", "base")
SIZES = ("mini", "full")

# The 23 official candidate resolutions, in the official order (facts doc, section 2).
CANDIDATE_RESOLUTIONS = [
    [384, 384], [384, 768], [768, 384], [384, 1152], [1152, 384], [384, 1536], [1536, 384], [768, 768],
    [384, 1920], [1920, 384], [384, 2304], [2304, 384], [768, 1152], [1152, 768], [384, 2688], [2688, 384],
    [384, 3072], [3072, 384], [768, 1536], [1536, 768], [384, 3456], [3456, 384], [1152, 1152],
]

# Class defaults the official configs rely on (only the fields that decide tensor shapes / routing).
VISION_DEFAULTS: dict[str, Any] = {"heads": 16, "image_size": 384}
PROJECTOR_DEFAULTS: dict[str, Any] = {"input_dim": 1152, "depth": 2, "mlp_ratio": 1, "downsample_ratio": 2}
LANGUAGE_DEFAULTS: dict[str, Any] = {
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "use_mla": True,
    "first_k_dense_replace": 0,
    "moe_layer_freq": 1,
    "n_shared_experts": None,
    "n_routed_experts": None,
    "topk_method": "gready",  # sic: the official class default
    "scoring_func": "softmax",
    "norm_topk_prob": False,
    "routed_scaling_factor": 1.0,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
}

_AUTO_MAP = {
    "AutoConfig": "configuration_deepseek.DeepseekV2Config",
    "AutoModel": "modeling_deepseek.DeepseekV2Model",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM",
}

_LANGUAGE_COMMON: dict[str, Any] = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "auto_map": _AUTO_MAP,
    "first_k_dense_replace": 1,
    "max_position_embeddings": 4096,
    "model_type": "deepseek_v2",
    "n_group": 1,
    "n_shared_experts": 2,
    "rm_head": False,
    "topk_group": 1,
}

# Language configs of the released checkpoints (facts doc, section 1).
_LANGUAGE_FULL: dict[str, dict[str, Any]] = {
    "tiny": {
        "bos_token_id": 0, "eos_token_id": 1, "hidden_size": 1280, "intermediate_size": 6848,
        "kv_lora_rank": None, "lm_head": True, "moe_intermediate_size": 896, "n_routed_experts": 64,
        "num_attention_heads": 10, "num_experts_per_tok": 6, "num_hidden_layers": 12, "num_key_value_heads": 10,
        "q_lora_rank": None, "qk_nope_head_dim": 0, "qk_rope_head_dim": 0, "topk_method": "greedy",
        "use_mla": False, "v_head_dim": 0, "vocab_size": 129280,
    },
    "small": {  # no bos/eos fields: the class defaults 100000/100001 match small's tokenizer
        "hidden_size": 2048, "intermediate_size": 10944, "kv_lora_rank": 512, "lm_head": False,
        "moe_intermediate_size": 1408, "n_routed_experts": 64, "num_attention_heads": 16,
        "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": None,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "topk_method": "greedy", "v_head_dim": 128,
        "vocab_size": 102400,
    },
    "base": {
        "bos_token_id": 0, "eos_token_id": 1, "hidden_size": 2560, "intermediate_size": 12288,
        "kv_lora_rank": 512, "lm_head": False, "moe_intermediate_size": 1536, "n_routed_experts": 72,
        "norm_topk_prob": True, "num_attention_heads": 32, "num_experts_per_tok": 6, "num_hidden_layers": 30,
        "num_key_value_heads": 32, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "routed_scaling_factor": 2.0, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "v_head_dim": 128,
        "vocab_size": 129280,
    },
}

# Mini structures. tiny mini is exactly the tiny_mha reference fixture's structure.
_LANGUAGE_MINI: dict[str, dict[str, Any]] = {
    "tiny": {
        **_LANGUAGE_FULL["tiny"], "hidden_size": 64, "intermediate_size": 160, "moe_intermediate_size": 32,
        "n_routed_experts": 16, "num_attention_heads": 4, "num_experts_per_tok": 4, "num_hidden_layers": 3,
        "num_key_value_heads": 4, "vocab_size": 384,
    },
    "small": {
        **_LANGUAGE_FULL["small"], "hidden_size": 96, "intermediate_size": 192, "kv_lora_rank": 32,
        "moe_intermediate_size": 24, "n_routed_experts": 16, "num_attention_heads": 4, "num_hidden_layers": 4,
        "num_key_value_heads": 4, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "vocab_size": 384,
    },
    "base": {
        **_LANGUAGE_FULL["base"], "hidden_size": 96, "intermediate_size": 192, "kv_lora_rank": 32,
        "moe_intermediate_size": 24, "n_routed_experts": 18, "num_attention_heads": 4, "num_hidden_layers": 4,
        "num_key_value_heads": 4, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "vocab_size": 384,
    },
}

_VISION_FULL: dict[str, Any] = {
    "layers": 27, "mlp_ratio": 3.7362, "model_name": "siglip_so400m_patch14_384", "model_type": "vision",
    "patch_size": 14, "width": 1152,
}
_VISION_MINI: dict[str, dict[str, Any]] = {
    "tiny": {**_VISION_FULL, "heads": 4, "layers": 2, "width": 64},
    "small": {**_VISION_FULL, "heads": 4, "layers": 3, "width": 96},
    "base": {**_VISION_FULL, "heads": 4, "layers": 3, "width": 96},
}


def make_config(variant: str, size: str = "mini", **language_overrides: Any) -> dict[str, Any]:
    """Return a fresh config.json dict for a variant; overrides go into language_config.

    The projector's n_embed follows hidden_size, since the projector must feed the LM.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")
    full = size == "full"
    language = {**_LANGUAGE_COMMON, **(_LANGUAGE_FULL if full else _LANGUAGE_MINI)[variant]}
    language.update(language_overrides)
    dtype = "bfloat16" if full else "float32"
    language["torch_dtype"] = dtype
    vision = dict(_VISION_FULL if full else _VISION_MINI[variant])
    projector: dict[str, Any] = {"model_type": "mlp_projector", "n_embed": language["hidden_size"]}
    if vision["width"] != PROJECTOR_DEFAULTS["input_dim"]:
        projector["input_dim"] = vision["width"]
    return copy.deepcopy({
        "candidate_resolutions": CANDIDATE_RESOLUTIONS,
        "global_view_pos": "head",
        "language_config": language,
        "model_type": "deepseek_vl_v2",
        "projector_config": projector,
        "tile_tag": "2D",
        "torch_dtype": dtype,
        "transformers_version": "4.38.2",
        "vision_config": vision,
    })


def processor_config() -> dict[str, Any]:
    """processor_config.json: identical for all three released variants."""
    return {
        "add_special_token": False,
        "candidate_resolutions": copy.deepcopy(CANDIDATE_RESOLUTIONS),
        "downsample_ratio": 2,
        "ignore_id": -100,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "image_token": "<image>",
        "mask_prompt": False,
        "normalize": True,
        "pad_token": "<｜▁pad▁｜>",
        "patch_size": 14,
        "processor_class": "DeepseekVLV2Processor",
        "sft_format": "deepseek",
    }
