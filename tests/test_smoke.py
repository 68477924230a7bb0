"""Smoke checkpoints: official layout (vs the reference fixtures), tokenizer ids, determinism, sharding, sizes."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from model.checkpoint import INDEX_NAME, CheckpointReader
from model.presets import make_config
from model.smoke import TASK_TOKENS, checkpoint_shapes, count_parameters, main, write_smoke_checkpoint

REPO = Path(__file__).resolve().parents[1]
FIXTURE_FOR = {"tiny": "tiny_mha-seed1", "small": "small_mla-seed1", "base": "small_mla-seed1"}
LAYOUT_FILES = {"config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", INDEX_NAME}


@pytest.fixture(scope="module")
def minis(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("smoke")
    return {v: write_smoke_checkpoint(root / v, v, "mini", seed=1) for v in ("tiny", "small", "base")}


def _pattern(keys: list[str]) -> set[str]:
    """Key names with layer/expert/block numbers folded, so different depths compare equal."""
    return {re.sub(r"\.\d+\.", ".N.", k) for k in keys}


def _weight_map(path: Path) -> dict[str, str]:
    return json.loads((path / INDEX_NAME).read_text())["weight_map"]


@pytest.mark.parametrize("variant", ["tiny", "small", "base"])
def test_mini_has_fixture_layout(minis: dict[str, Path], fixtures_dir: Path, variant: str) -> None:
    path, ref = minis[variant], fixtures_dir / FIXTURE_FOR[variant]
    non_weights = lambda d: {p.name for p in d.iterdir() if p.suffix != ".safetensors"}  # noqa: E731
    assert non_weights(path) == non_weights(ref) == LAYOUT_FILES
    mine, theirs = _pattern(list(_weight_map(path))), _pattern(list(_weight_map(ref)))
    gate_bias = "language.model.layers.N.mlp.gate.e_score_correction_bias"
    if variant == "small":  # small routes greedy/softmax: no gate bias (the fixture mirrors base's routing)
        theirs.discard(gate_bias)
    assert mine == theirs
    with CheckpointReader(path) as reader:
        assert reader.keys() == sorted(_weight_map(path))
        shapes = checkpoint_shapes(reader.config())
        assert {k: reader.shape(k) for k in reader.keys()} == shapes
        assert all(reader.dtype(k) == torch.float32 for k in reader.keys())


def test_shapes_formula_reproduces_fixtures(fixtures_dir: Path) -> None:
    for name in ("tiny_mha-seed1", "small_mla-seed1"):
        with CheckpointReader(fixtures_dir / name) as reader:
            assert checkpoint_shapes(reader.config()) == {k: reader.shape(k) for k in reader.keys()}


def test_tiny_mini_files_match_fixture_byte_for_byte(minis: dict[str, Path], fixtures_dir: Path) -> None:
    ref = fixtures_dir / "tiny_mha-seed1"
    for name in ("config.json", "processor_config.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (minis["tiny"] / name).read_bytes() == (ref / name).read_bytes(), name
    small_ref = fixtures_dir / "small_mla-seed1"
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # small's id layout, like small_mla
        assert (minis["small"] / name).read_bytes() == (small_ref / name).read_bytes(), name


@pytest.mark.parametrize("variant", ["tiny", "small", "base"])
def test_tokenizer_ids_match_config(minis: dict[str, Path], variant: str) -> None:
    path = minis[variant]
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    lang = json.loads((path / "config.json").read_text())["language_config"]
    bos, eos, pad = (tok.token_to_id(t) for t in ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"))
    assert (lang["bos_token_id"], lang["eos_token_id"]) == (bos, eos)
    if variant == "small":  # BPE first, then bos, eos, pad, <image>, ...
        assert (bos, eos, pad) == (360, 361, 362)
    else:
        assert (bos, eos, pad) == (0, 1, 2)
    task_ids = [tok.token_to_id(t) for t in TASK_TOKENS]
    assert task_ids == list(range(task_ids[0], task_ids[0] + len(TASK_TOKENS)))
    assert task_ids[-1] == tok.get_vocab_size() - 1 < lang["vocab_size"]
    enc = tok.encode("<|User|>: <image>\nRead 2024 pages.")
    assert enc.ids[0] == bos and task_ids[0] in enc.ids and task_ids[-2] in enc.ids
    assert tok.decode(enc.ids, skip_special_tokens=True) == ": \nRead 2024 pages."
    special = json.loads((path / "tokenizer_config.json").read_text())
    assert special["tokenizer_class"] == "LlamaTokenizerFast" and special["legacy"] and special["add_bos_token"]
    assert special["added_tokens_decoder"][str(bos)]["content"] == special["bos_token"]


def test_deterministic_for_a_seed(minis: dict[str, Path], tmp_path: Path) -> None:
    again = write_smoke_checkpoint(tmp_path / "again", "small", "mini", seed=1)
    for p in minis["small"].iterdir():
        assert (again / p.name).read_bytes() == p.read_bytes(), p.name
    other = write_smoke_checkpoint(tmp_path / "other", "small", "mini", seed=2)
    with CheckpointReader(other) as a, CheckpointReader(again) as b:
        assert not torch.equal(a.get("vision.pos_embed"), b.get("vision.pos_embed"))


def test_sharding_and_index(minis: dict[str, Path], tmp_path: Path) -> None:
    path = write_smoke_checkpoint(tmp_path / "sharded", "base", "mini", seed=1, shard_size_mb=1)
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    n = len(shards)
    assert n > 1 and shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    index = json.loads((path / INDEX_NAME).read_text())
    total = 0
    for shard in shards:
        assert (path / shard).stat().st_size <= 1.1 * 2**20
        with safe_open(str(path / shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():
                assert index["weight_map"][key] == shard
                total += math.prod(f.get_slice(key).get_shape()) * 4  # float32
    assert total == index["metadata"]["total_size"]
    with CheckpointReader(path) as sharded, CheckpointReader(minis["base"]) as single:
        assert sharded.keys() == single.keys()
        for key in sharded.keys()[::7]:  # values do not depend on the shard layout
            assert torch.equal(sharded.get(key), single.get(key))


def test_init_statistics_mimic_fixtures(minis: dict[str, Path]) -> None:
    with CheckpointReader(minis["small"]) as r:
        assert abs(r.get("language.model.embed_tokens.weight").std().item() - 0.5) < 0.03
        w = r.get("vision.blocks.0.mlp.fc2.weight")  # fan_in 358
        assert abs(w.std().item() - 358 ** -0.5) < 0.01
        assert abs(r.get("language.model.layers.1.mlp.experts.0.down_proj.weight").std().item() - 0.15) < 0.02
        norm = r.get("vision.blocks.0.norm1.weight")
        assert abs(norm.mean().item() - 1) < 0.05 and 0.05 < norm.std().item() < 0.15
        assert abs(r.get("vision.blocks.0.attn.qkv.bias").std().item() - 0.05) < 0.015
    with CheckpointReader(minis["base"]) as r:
        assert r.shape("language.model.layers.3.mlp.gate.e_score_correction_bias") == (18,)


def test_bfloat16_and_overrides(tmp_path: Path) -> None:
    overrides = {"q_lora_rank": 24, "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}
    path = write_smoke_checkpoint(tmp_path / "bf16", "small", "mini", seed=0, dtype="bfloat16",
                                  language_overrides=overrides)
    with CheckpointReader(path) as r:
        cfg = r.config()
        assert cfg["torch_dtype"] == cfg["language_config"]["torch_dtype"] == "bfloat16"
        assert {k: cfg["language_config"][k] for k in overrides} == overrides
        assert r.shape("language.model.layers.0.self_attn.q_a_proj.weight") == (24, 96)
        assert r.shape("language.model.layers.0.self_attn.q_b_proj.weight") == (4 * 24, 24)
        assert "language.model.layers.0.self_attn.q_proj.weight" not in r.keys()
        assert r.dtype("vision.pos_embed") == torch.bfloat16
        assert r.get("vision.pos_embed", dtype=torch.float32).dtype == torch.float32


def test_make_config_keeps_projector_in_sync_and_rejects_unknown() -> None:
    assert make_config("base", "mini", hidden_size=80)["projector_config"]["n_embed"] == 80
    with pytest.raises(ValueError, match="variant"):
        make_config("huge", "mini")
    with pytest.raises(ValueError, match="size"):
        make_config("tiny", "medium")


@pytest.mark.parametrize("variant,total,vision,projector", [
    ("tiny", 3.3705e9, 428.2e6, 7.5e6), ("small", 16.148e9, 428.2e6, 13.6e6), ("base", 27.480e9, 428.2e6, 18.4e6),
])
def test_full_size_parameter_counts(variant: str, total: float, vision: float, projector: float) -> None:
    shapes = checkpoint_shapes(make_config(variant, "full"))
    part = lambda prefix: sum(math.prod(s) for k, s in shapes.items() if k.startswith(prefix))  # noqa: E731
    assert count_parameters(make_config(variant, "full")) == pytest.approx(total, rel=1e-3)
    assert part("vision.") == pytest.approx(vision, rel=1e-3)
    assert part("projector.") == pytest.approx(projector, rel=1e-2)
    assert shapes["vision.blocks.26.attn.qkv.weight"] == (3456, 1152)
    assert shapes["vision.blocks.26.mlp.fc1.weight"] == (4304, 1152)
    assert ("language.model.layers.1.mlp.gate.e_score_correction_bias" in shapes) == (variant == "base")


def test_cli_dry_run_and_write(tmp_path: Path) -> None:
    run = lambda *args: subprocess.run([sys.executable, "-m", "model.smoke", *args], cwd=REPO,  # noqa: E731
                                       capture_output=True, text=True, check=True).stdout
    lines = run("--variant", "tiny", "--size", "full", "--dry-run").splitlines()
    assert lines[0].startswith("image_newline\t[1280]")
    assert json.loads(lines[-1])["total_params"] == pytest.approx(3.3705e9, rel=1e-3)
    out = tmp_path / "cli"  # writing goes through the same argument parsing, in-process (saves a torch import)
    assert main(["--variant", "small", "--size", "mini", "--seed", "1", "--out", str(out), "--shard-size-mb", "2"]) == 0
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 2
    with CheckpointReader(out) as r:
        lang = r.config()["language_config"]
        assert "use_mla" not in lang and lang["kv_lora_rank"] == 32 and lang["q_lora_rank"] is None  # MLA default
        assert "language.model.layers.0.self_attn.kv_b_proj.weight" in r.keys()


@pytest.mark.parametrize("variant", ["tiny", "small", "base"])
def test_mini_is_a_usable_random_model(minis: dict[str, Path], variant: str) -> None:
    """Through the public loader: finite, non-degenerate logits (fixture-like scale) on an image prompt."""
    from PIL import Image

    from model import load_pretrained

    model, processor = load_pretrained(str(minis[variant]))
    conversation = [{"role": "<|User|>", "content": "<image>\nDescribe."}, {"role": "<|Assistant|>", "content": ""}]
    with torch.no_grad():
        logits = model(processor(conversation, [Image.new("RGB", (400, 300), (200, 30, 30))]))
    assert logits.shape[-1] == 384 and torch.isfinite(logits).all()
    assert 0.3 < logits.std().item() < 3.0


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_random_pretrained_equals_the_written_checkpoint_on_cpu(minis: dict[str, Path], variant: str) -> None:
    """The in-memory random model (the GPU benchmarks' way: nothing written) goes through the same loading checks
    and, drawn on the CPU, holds exactly the weights a written checkpoint of the same seed holds, and the same
    processor."""
    from model import load_pretrained
    from model.smoke import RandomWeights, random_pretrained, smoke_config

    model, processor = random_pretrained(variant, "mini", device="cpu", dtype=torch.float32, seed=1)
    ref, ref_proc = load_pretrained(minis[variant], dtype=torch.float32)
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    conv = [{"role": "<|User|>", "content": "Describe the page."}, {"role": "<|Assistant|>", "content": ""}]
    assert processor(conv, []).input_ids.tolist() == ref_proc(conv, []).input_ids.tolist()
    config, _ = smoke_config(variant, "mini", "float32")
    reader = RandomWeights(config, seed=1)
    with CheckpointReader(minis[variant]) as written:
        assert sorted(reader.keys()) == sorted(written.keys())
        key = next(k for k in reader.keys() if k.endswith("embed_tokens.weight"))
        assert reader.shape(key) == tuple(written.shape(key))
        assert torch.equal(reader.get(key, dtype=torch.bfloat16), written.get(key).to(torch.bfloat16))
