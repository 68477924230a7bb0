"""Random-weight DeepSeek-VL2 checkpoints in the official layout, for tests and smoke runs.

    python -m model.smoke --variant {tiny,small,base} --size {mini,full} --seed N --out DIR
                          [--dtype bfloat16|float32] [--shard-size-mb N] [--dry-run]

The files mirror the released repos (and the reference fixtures): config.json, processor_config.json,
tokenizer.json, tokenizer_config.json, special_tokens_map.json, model-0000k-of-0000n.safetensors and
model.safetensors.index.json.  Full sizes are written shard by shard with each tensor generated directly in
the target dtype, so peak memory is about one shard, never a float32 copy of the whole model.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from model.presets import LANGUAGE_DEFAULTS, PROJECTOR_DEFAULTS, VISION_DEFAULTS, make_config, processor_config

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
PLACEHOLDERS = [f"<｜place▁holder▁no▁{i}｜>" for i in range(4)]
TASK_TOKENS = ["<image>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "<|User|>", "<|Assistant|>"]
INDEX_NAME = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Training text for the toy BPE: enough repeated words for ~100 merges, fixed so the vocab is reproducible.
_BPE_TEXT = """\
The scanned page shows a table with three columns and a title at the top of the document.
Describe the image in detail. Locate the red circle and the blue square in the picture.
A second page has handwritten notes in the margin, a date, a signature and the page number 12.
The invoice lists 4 items, the total amount, the tax and the address of the company.
Read the text of the chart: the value for 2019 is 35 and the value for 2020 is 47.
There is a photograph of a street with cars, people walking and a shop sign on the left.
Convert the document to markdown, keeping the headings, the lists and the tables.
The figure caption says that the model was trained on images of documents and natural scenes.
Where is the giraffe at the back? The giraffe stands next to a tree near the fence.
This paragraph continues on the next page; the footnote explains the abbreviations used in the text.
"""


# ----------------------------------------------------------------------------------------------- tokenizer

def _bos_first(variant: str) -> bool:
    """tiny and base put bos/eos/pad at ids 0-2; small appends them after the BPE vocabulary."""
    return variant != "small"


def build_tokenizer(variant: str) -> Tokenizer:
    """A small byte-level BPE with the variant's special tokens and id layout (trained offline, deterministic)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    bos_first = _bos_first(variant)
    trainer = trainers.BpeTrainer(
        vocab_size=370 if bos_first else 360,
        special_tokens=[BOS, EOS, PAD] if bos_first else [],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_BPE_TEXT.splitlines(), trainer)
    if bos_first:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in PLACEHOLDERS])
    else:  # small's tokenizer marks bos/eos as normalized
        tok.add_special_tokens([AddedToken(BOS, special=True, normalized=True),
                                AddedToken(EOS, special=True, normalized=True),
                                AddedToken(PAD, special=True, normalized=False)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TASK_TOKENS])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)])
    return tok


def _token_entry(t: AddedToken) -> dict[str, Any]:
    return {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
            "single_word": t.single_word}


def tokenizer_files(tok: Tokenizer) -> dict[str, dict[str, Any]]:
    """tokenizer_config.json and special_tokens_map.json in the official (transformers 4.38) shape."""
    added = tok.get_added_tokens_decoder()
    by_content = {t.content: t for t in added.values()}
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): {**_token_entry(t), "special": t.special} for i, t in sorted(added.items())},
        "additional_special_tokens": ["<|User|>", "<|Assistant|>"],
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "legacy": True,
        "model_max_length": 16384,
        "pad_token": PAD,
        "tokenizer_class": "LlamaTokenizerFast",
        "unk_token": None,
        "use_default_system_prompt": False,
    }
    special_map = {
        "additional_special_tokens": [_token_entry(by_content[t]) for t in ("<|User|>", "<|Assistant|>")],
        "bos_token": _token_entry(by_content[BOS]),
        "eos_token": _token_entry(by_content[EOS]),
        "pad_token": _token_entry(by_content[PAD]),
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": special_map}


# ------------------------------------------------------------------------------------------------- weights

def checkpoint_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every official checkpoint key and its shape for a config.json dict (class defaults applied), sorted."""
    vis = {**VISION_DEFAULTS, **config["vision_config"]}
    proj = {**PROJECTOR_DEFAULTS, **config["projector_config"]}
    lang = {**LANGUAGE_DEFAULTS, **config["language_config"]}
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out_f: int, in_f: int, bias: bool = False) -> None:
        shapes[f"{name}.weight"] = (out_f, in_f)
        if bias:
            shapes[f"{name}.bias"] = (out_f,)

    def layer_norm(name: str, dim: int) -> None:
        shapes[f"{name}.weight"] = (dim,)
        shapes[f"{name}.bias"] = (dim,)

    # Vision: timm VisionTransformer names, incl. the unused "map" attention-pool head.
    width, patch = vis["width"], vis["patch_size"]
    mlp = int(width * vis["mlp_ratio"])
    shapes["vision.pos_embed"] = (1, (vis["image_size"] // patch) ** 2, width)
    shapes["vision.patch_embed.proj.weight"] = (width, 3, patch, patch)
    shapes["vision.patch_embed.proj.bias"] = (width,)
    for i in range(vis["layers"]):
        b = f"vision.blocks.{i}"
        layer_norm(f"{b}.norm1", width)
        linear(f"{b}.attn.qkv", 3 * width, width, bias=True)
        linear(f"{b}.attn.proj", width, width, bias=True)
        layer_norm(f"{b}.norm2", width)
        linear(f"{b}.mlp.fc1", mlp, width, bias=True)
        linear(f"{b}.mlp.fc2", width, mlp, bias=True)
    layer_norm("vision.norm", width)
    shapes["vision.attn_pool.latent"] = (1, 1, width)
    linear("vision.attn_pool.q", width, width, bias=True)
    linear("vision.attn_pool.kv", 2 * width, width, bias=True)
    linear("vision.attn_pool.proj", width, width, bias=True)
    layer_norm("vision.attn_pool.norm", width)
    linear("vision.attn_pool.mlp.fc1", mlp, width, bias=True)
    linear("vision.attn_pool.mlp.fc2", width, mlp, bias=True)

    # Projector (downsample_mlp_gelu): Linear, then (GELU, Linear) * (depth - 1).
    n_embed = proj["n_embed"]
    linear("projector.layers.0", n_embed, proj["input_dim"] * proj["downsample_ratio"] ** 2, bias=True)
    for d in range(1, proj["depth"]):
        linear(f"projector.layers.{2 * d}", n_embed, n_embed, bias=True)
    shapes["image_newline"] = (n_embed,)
    shapes["view_seperator"] = (n_embed,)  # sic, as in the checkpoints

    # Language model.
    hidden, vocab, heads = lang["hidden_size"], lang["vocab_size"], lang["num_attention_heads"]
    shapes["language.model.embed_tokens.weight"] = (vocab, hidden)
    shapes["language.model.norm.weight"] = (hidden,)
    shapes["language.lm_head.weight"] = (vocab, hidden)
    for i in range(lang["num_hidden_layers"]):
        b = f"language.model.layers.{i}"
        shapes[f"{b}.input_layernorm.weight"] = (hidden,)
        shapes[f"{b}.post_attention_layernorm.weight"] = (hidden,)
        a = f"{b}.self_attn"
        if lang["use_mla"]:
            nope, rope, v_dim, kv_rank = (lang["qk_nope_head_dim"], lang["qk_rope_head_dim"], lang["v_head_dim"],
                                          lang["kv_lora_rank"])
            if lang["q_lora_rank"] is None:
                linear(f"{a}.q_proj", heads * (nope + rope), hidden)
            else:
                linear(f"{a}.q_a_proj", lang["q_lora_rank"], hidden)
                shapes[f"{a}.q_a_layernorm.weight"] = (lang["q_lora_rank"],)
                linear(f"{a}.q_b_proj", heads * (nope + rope), lang["q_lora_rank"])
            linear(f"{a}.kv_a_proj_with_mqa", kv_rank + rope, hidden)
            shapes[f"{a}.kv_a_layernorm.weight"] = (kv_rank,)
            linear(f"{a}.kv_b_proj", heads * (nope + v_dim), kv_rank)
            linear(f"{a}.o_proj", hidden, heads * v_dim)
        else:  # LlamaAttention
            head_dim = hidden // heads
            kv_heads = lang.get("num_key_value_heads") or heads
            linear(f"{a}.q_proj", heads * head_dim, hidden)
            linear(f"{a}.k_proj", kv_heads * head_dim, hidden)
            linear(f"{a}.v_proj", kv_heads * head_dim, hidden)
            linear(f"{a}.o_proj", hidden, heads * head_dim)
        m = f"{b}.mlp"
        is_moe = (lang["n_routed_experts"] is not None and i >= lang["first_k_dense_replace"]
                  and i % lang["moe_layer_freq"] == 0)
        if not is_moe:
            _swiglu(linear, m, hidden, lang["intermediate_size"])
            continue
        moe_inter, n_experts = lang["moe_intermediate_size"], lang["n_routed_experts"]
        shapes[f"{m}.gate.weight"] = (n_experts, hidden)
        if lang["topk_method"] == "noaux_tc":
            shapes[f"{m}.gate.e_score_correction_bias"] = (n_experts,)
        for e in range(n_experts):
            _swiglu(linear, f"{m}.experts.{e}", hidden, moe_inter)
        if lang["n_shared_experts"]:
            _swiglu(linear, f"{m}.shared_experts", hidden, moe_inter * lang["n_shared_experts"])
    return dict(sorted(shapes.items()))


def _swiglu(linear: Any, name: str, hidden: int, inter: int) -> None:
    linear(f"{name}.gate_proj", inter, hidden)
    linear(f"{name}.up_proj", inter, hidden)
    linear(f"{name}.down_proj", hidden, inter)


def count_parameters(config: dict[str, Any]) -> int:
    return sum(math.prod(s) for s in checkpoint_shapes(config).values())


def init_tensor(key: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype,
                device: str | torch.device = "cpu") -> torch.Tensor:
    """One tensor with the reference fixtures' init statistics, seeded per key.

    Seeding per key makes the values independent of shard size and write order.  Statistics (measured on
    the fixtures): linear/conv N(0, min(0.15, fan_in^-1/2)), norm weights 1 + N(0, 0.1), biases
    N(0, 0.05), token embeddings N(0, 0.5), position/latent/layout vectors and gate bias N(0, 0.1).
    """
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    gen = torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    t = torch.randn(shape, generator=gen, dtype=dtype, device=device)
    module, _, leaf = key.rpartition(".")
    if key.endswith("embed_tokens.weight"):
        return t.mul_(0.5)
    if leaf == "weight" and "norm" in module.rpartition(".")[2]:
        return t.mul_(0.1).add_(1.0)
    if leaf == "bias":
        return t.mul_(0.05)
    if leaf == "weight":
        return t.mul_(min(0.15, math.prod(shape[1:]) ** -0.5))
    return t.mul_(0.1)  # pos_embed, attn_pool.latent, image_newline, view_seperator, e_score_correction_bias


def plan_shards(shapes: dict[str, tuple[int, ...]], itemsize: int, shard_bytes: int) -> list[list[str]]:
    """Split keys (in order) into shards of at most shard_bytes (a larger single tensor gets its own shard)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def shard_name(k: int, n: int) -> str:
    # A single shard is named like the released tiny checkpoint ("-of-000001", six digits).
    return "model-00001-of-000001.safetensors" if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"


def _write_json(path: Path, obj: Any, ascii_only: bool = True) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=ascii_only) + "\n", encoding="utf-8")


def save_tokenizer_json(tok: Tokenizer, path: Path) -> None:
    """tokenizer.json in the pre-0.20 `tokenizers` format (BPE merges as "a b" strings, no
    ignore_merges key), as the released checkpoints have it: tokenizers 0.15 (the reference's
    transformers 4.38 pin) cannot read the list-of-pairs merges that newer versions write."""
    obj = json.loads(tok.to_str())
    model = obj["model"]
    assert model["type"] == "BPE" and not model.pop("ignore_merges", False)
    assert all(" " not in a and " " not in b for a, b in model["merges"])
    model["merges"] = [f"{a} {b}" for a, b in model["merges"]]
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def smoke_config(variant: str, size: str, dtype: str | None = None,
                 language_overrides: dict[str, Any] | None = None) -> tuple[dict[str, Any], Tokenizer]:
    """The config.json dict a smoke checkpoint gets, and its tokenizer (bos/eos ids taken from it)."""
    config = make_config(variant, size, **(language_overrides or {}))
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        config["torch_dtype"] = config["language_config"]["torch_dtype"] = dtype
    tok = build_tokenizer(variant)
    lang = config["language_config"]
    lang["bos_token_id"], lang["eos_token_id"] = tok.token_to_id(BOS), tok.token_to_id(EOS)
    if tok.get_vocab_size() > lang["vocab_size"]:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens but vocab_size is {lang['vocab_size']}")
    return config, tok


def write_smoke_checkpoint(out_dir: str | Path, variant: str, size: str = "mini", seed: int = 0,
                           dtype: str | None = None, language_overrides: dict[str, Any] | None = None,
                           shard_size_mb: float = 5000) -> Path:
    """Write a random-weight checkpoint directory in the official layout; deterministic for a seed.

    dtype defaults to float32 for mini (like the fixtures) and bfloat16 for full (like the releases).
    """
    config, tok = smoke_config(variant, size, dtype, language_overrides)
    return write_checkpoint(out_dir, config, tok, seed, shard_size_mb)


def write_checkpoint(out_dir: str | Path, config: dict[str, Any], tok: Tokenizer, seed: int,
                     shard_size_mb: float = 5000, weights: bool = True) -> Path:
    """Write `config` with random weights (dtype from its torch_dtype) and `tok` in the official layout;
    without `weights`, only the config and tokenizer files (what `random_pretrained` needs)."""
    torch_dtype = DTYPES[config["torch_dtype"]]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", config)
    _write_json(out / "processor_config.json", processor_config())
    save_tokenizer_json(tok, out / "tokenizer.json")
    for name, obj in tokenizer_files(tok).items():
        _write_json(out / name, obj, ascii_only=False)

    if not weights:
        return out
    shapes = checkpoint_shapes(config)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    shards = plan_shards(shapes, itemsize, int(shard_size_mb * 2**20))
    weight_map: dict[str, str] = {}
    for k, keys in enumerate(shards, start=1):
        name = shard_name(k, len(shards))
        tensors = {key: init_tensor(key, shapes[key], seed, torch_dtype) for key in keys}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        del tensors  # free this shard before generating the next one
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(math.prod(s) for s in shapes.values()) * itemsize
    _write_json(out / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return out


class RandomWeights:
    """A weight reader (model.loading's Reader) that draws each tensor on the target device instead of reading it.

    Real-size benchmarks on a GPU then skip writing and re-reading 7-55 GB: same keys, shapes and init statistics
    as a written checkpoint (draws on the device differ in value from the CPU's)."""

    def __init__(self, config: dict[str, Any], seed: int = 0) -> None:
        self._shapes, self.seed = checkpoint_shapes(config), seed

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def get(self, key: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        return init_tensor(key, self._shapes[key], self.seed, dtype or torch.float32, device)


def random_pretrained(variant: str, size: str = "full", device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.bfloat16, seed: int = 0, out_dir: str | Path | None = None):
    """(model, processor) of a random-weight checkpoint built in memory on `device`: the config and tokenizer
    files go to `out_dir` (a temporary dir by default), the weights through `RandomWeights` and the normal
    loading path (same key and shape checks)."""
    import tempfile

    from model.config import load_config
    from model.loading import build_empty, load_weights
    from model.processor import Processor

    config, tok = smoke_config(variant, size, next(k for k, v in DTYPES.items() if v == dtype))
    out = Path(out_dir or tempfile.mkdtemp(prefix=f"pagemill-{variant}-{size}-"))
    write_checkpoint(out, config, tok, seed, weights=False)
    model = build_empty(load_config(out), torch.device(device), dtype)
    load_weights(model, RandomWeights(config, seed), torch.device(device), f"random {variant} {size}")
    return model.eval(), Processor.from_pretrained(out)


def _dry_run_lines(config: dict[str, Any]) -> Iterator[str]:
    shapes = checkpoint_shapes(config)
    for key, shape in shapes.items():
        yield f"{key}\t{list(shape)}"
    yield json.dumps({"keys": len(shapes), "total_params": sum(math.prod(s) for s in shapes.values())})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.smoke", description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=["tiny", "small", "base"], required=True)
    parser.add_argument("--size", choices=["mini", "full"], default="mini")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="output directory (required unless --dry-run)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    parser.add_argument("--shard-size-mb", type=float, default=5000)
    parser.add_argument("--dry-run", action="store_true", help="print every key, its shape and the totals; write nothing")
    args = parser.parse_args(argv)
    if args.dry_run:
        config, _ = smoke_config(args.variant, args.size, args.dtype)
        for line in _dry_run_lines(config):
            print(line)
        return 0
    if args.out is None:
        parser.error("--out is required")
    path = write_smoke_checkpoint(args.out, args.variant, args.size, args.seed, args.dtype,
                                  shard_size_mb=args.shard_size_mb)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
