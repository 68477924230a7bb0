"""Every way loading a checkpoint into the model can fail says which keys or fields are wrong."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import CheckpointError, ConfigError, load_pretrained, load_processor
from model.smoke import write_smoke_checkpoint


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return write_smoke_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", "mini", seed=5)


def edited(clean, tmp_path, edit):
    """A copy of the clean checkpoint whose single weights file is passed through `edit`."""
    d = tmp_path / "edited"
    shutil.copytree(clean, d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    tensors = {}
    for f in files:
        tensors.update(load_file(str(d / f)))
        (d / f).unlink()
    edit(tensors)
    save_file(tensors, str(d / files[0]))
    index["weight_map"] = {k: files[0] for k in tensors}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


def test_clean_checkpoint_loads(clean):
    model, processor = load_pretrained(clean)
    assert model.language.model.layers[1].mlp.experts.gate_proj.shape[0] > 1
    assert load_processor(clean).eos_id == processor.eos_id


def test_missing_key_is_named(clean, tmp_path):
    d = edited(clean, tmp_path, lambda t: t.pop("language.model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys: language\.model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        load_pretrained(d)


def test_unexpected_key_is_named(clean, tmp_path):
    d = edited(clean, tmp_path, lambda t: t.__setitem__("language.model.layers.0.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected keys: language\.model\.layers\.0\.extra\.weight"):
        load_pretrained(d)


def test_unused_vision_head_is_optional(clean, tmp_path):
    d = edited(clean, tmp_path, lambda t: [t.pop(k) for k in list(t) if k.startswith("vision.attn_pool.")])
    model, _ = load_pretrained(d)
    assert model.vision.pos_embed.shape[1] == 729


def test_misshaped_key_is_named_with_shapes(clean, tmp_path):
    def grow(t):
        w = t["projector.layers.2.weight"]
        t["projector.layers.2.weight"] = torch.zeros(w.shape[0], w.shape[1] + 1)
    d = edited(clean, tmp_path, grow)
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: projector\.layers\.2\.weight \(\d+, \d+\) \(expected"):
        load_pretrained(d)


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("tile_tag",), "1D", "tile_tag"),
        (("global_view_pos",), "tail", "global_view_pos"),
        (("language_config", "topk_method"), "random_routing", "topk_method"),
        (("language_config", "scoring_func"), "relu", "scoring_func"),
        (("language_config", "rope_scaling"), {"type": "linear", "factor": 2.0}, "rope_scaling"),
        (("projector_config", "projector_type"), "linear", "projector_type"),
        (("language_config", "hidden_size"), "wide", "hidden_size"),
    ],
)
def test_unsupported_config_is_named(clean, tmp_path, path, value, message):
    d = tmp_path / "cfg"
    shutil.copytree(clean, d)
    cfg = json.loads((d / "config.json").read_text())
    node = cfg
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises((ConfigError, ValueError), match=message):
        load_pretrained(d)


def test_weights_land_in_target_dtype(clean):
    model, _ = load_pretrained(clean, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ref = load_file(str(next(clean.glob("*.safetensors"))))
    got = model.language.model.layers[1].mlp.experts.down_proj[2]
    want = ref["language.model.layers.1.mlp.experts.2.down_proj.weight"].to(torch.bfloat16)
    assert torch.equal(got, want)
