"""DeepSeek-VL2 configuration, read from the official `config.json`.

The official files leave many fields to the reference classes' defaults (DeepseekV2Config,
VisionEncoderConfig, MlpProjectorConfig); the defaults below are those classes' values, so a
config that omits a field means what it meant to the reference.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator


class ConfigError(ValueError):
    """A config.json we cannot run; the message names the field."""


class VisionConfig(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    model_name: str = "siglip_large_patch16_384"
    image_size: int = 384
    patch_size: int = 16
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    global_pool: str = "map"
    ignore_head: bool = True
    class_token: bool = False

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


class ProjectorConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    projector_type: str = "downsample_mlp_gelu"
    input_dim: int = 1152
    n_embed: int = 2048
    depth: int = 2
    mlp_ratio: int = 1
    downsample_ratio: int = 2
    token_pooling: bool = False


class LanguageConfig(BaseModel):
    """DeepseekV2Config fields the decoder uses, with that class's defaults."""

    model_config = ConfigDict(extra="ignore")

    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    n_shared_experts: int | None = None
    n_routed_experts: int | None = None
    routed_scaling_factor: float = 1.0
    kv_lora_rank: int | None = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "gready"  # sic: the reference's default spelling
    n_group: int | None = None
    topk_group: int | None = None
    num_experts_per_tok: int | None = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    bos_token_id: int | None = 100000
    eos_token_id: int | None = 100001
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    use_mla: bool = True

    @model_validator(mode="after")
    def _check(self) -> "LanguageConfig":
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.topk_method == "gready":
            self.topk_method = "greedy"
        if self.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ValueError(f"topk_method {self.topk_method!r} is not supported")
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring_func {self.scoring_func!r} is not supported")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind != "yarn" or not self.use_mla:
                raise ValueError(f"rope_scaling {self.rope_scaling!r} is not supported (only yarn with MLA)")
        if self.use_mla and self.kv_lora_rank is None:
            raise ValueError("kv_lora_rank must be set when use_mla is true")
        if self.n_routed_experts is not None:
            if not self.num_experts_per_tok:
                raise ValueError("num_experts_per_tok must be set when n_routed_experts is set")
            if self.topk_method != "greedy":
                if not self.n_group or not self.topk_group or self.n_routed_experts % self.n_group:
                    raise ValueError(
                        f"topk_method {self.topk_method!r} needs n_group dividing n_routed_experts and topk_group"
                    )
        return self

    @property
    def head_dim(self) -> int:
        """MHA head size (LlamaAttention: hidden_size / heads)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def q_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        return (
            self.n_routed_experts is not None
            and i >= self.first_k_dense_replace
            and i % self.moe_layer_freq == 0
        )


class VL2Config(BaseModel):
    model_config = ConfigDict(extra="ignore")

    vision_config: VisionConfig = VisionConfig()
    projector_config: ProjectorConfig = ProjectorConfig()
    language_config: LanguageConfig = LanguageConfig()
    candidate_resolutions: list[tuple[int, int]] = [(384, 384)]
    tile_tag: Literal["2D"] = "2D"
    global_view_pos: Literal["head"] = "head"

    @model_validator(mode="after")
    def _check(self) -> "VL2Config":
        p, v, lang = self.projector_config, self.vision_config, self.language_config
        if p.projector_type != "downsample_mlp_gelu":
            raise ValueError(f"projector_type {p.projector_type!r} is not supported (only downsample_mlp_gelu)")
        if p.token_pooling:
            raise ValueError("projector token_pooling is not supported")
        if p.input_dim != v.width:
            raise ValueError(f"projector input_dim {p.input_dim} != vision width {v.width}")
        if p.n_embed != lang.hidden_size:
            raise ValueError(f"projector n_embed {p.n_embed} != language hidden_size {lang.hidden_size}")
        if v.class_token:
            raise ValueError("vision class_token is not supported")
        return self


def parse_config(raw: dict[str, Any], source: str = "config.json") -> VL2Config:
    """Validate an official config dict; errors name the offending field."""
    try:
        return VL2Config.model_validate(raw)
    except ValidationError as e:
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
            parts.append(f"{loc}: {err['msg']} (got {err.get('input')!r})"[:300])
        raise ConfigError(f"{source}: unsupported DeepSeek-VL2 config: " + "; ".join(parts)) from None


def load_config(path: str | Path) -> VL2Config:
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config.json not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return parse_config(raw, str(path))
