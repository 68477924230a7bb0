"""Processor vs the official DeepseekVLV2Processor goldens, plus batching and config checks."""
import io
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.processor import BatchInputs, PreparedInput, Processor

CKPTS = ["tiny_mha-seed1", "small_mla-seed1"]
CASES = ["text_only", "single_1000x400_rgba", "two_images_tiled", "three_images_untiled", "grounding_ref"]
FIELDS = ["input_ids", "attention_mask", "images_seq_mask", "images_spatial_crop"]


@pytest.fixture(scope="module")
def processors(fixtures_dir):
    return {c: Processor.from_pretrained(fixtures_dir / c) for c in CKPTS}


@pytest.fixture(scope="module")
def goldens(fixtures_dir):
    return {c: np.load(fixtures_dir / f"{c}.golden.npz") for c in CKPTS}


def load_case(z, case):
    conv = json.loads(str(z[f"{case}__conversation_json"]))
    # Raw PNG mode (L, RGBA, ...): the processor's own RGB conversion must match the reference's.
    images = [Image.open(io.BytesIO(z[f"{case}__image{j}_png"].tobytes())) for j in range(int(z[f"{case}__num_images"]))]
    return conv, images


def test_golden_case_list_is_complete(goldens):
    for z in goldens.values():
        assert json.loads(str(z["meta_json"]))["cases"] == CASES


@pytest.mark.parametrize("ckpt", CKPTS)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference_golden(processors, goldens, ckpt, case):
    p, z = processors[ckpt], goldens[ckpt]
    conv, images = load_case(z, case)
    prep = p.prepare(conv, images)
    out = p.collate([prep])
    for f in FIELDS:
        want = torch.from_numpy(z[f"{case}__{f}"])
        got = getattr(out, f)
        assert got.dtype == want.dtype and torch.equal(got, want), f
    want_images = torch.from_numpy(z[f"{case}__images"])
    assert out.images.shape == want_images.shape and out.images.dtype == torch.float32
    assert (out.images - want_images).abs().max().item() <= 1e-6
    assert p.format_prompt(conv) == str(z[f"{case}__sft_format"])
    assert prep.num_image_tokens.tolist() == z[f"{case}__num_image_tokens"].tolist()
    assert torch.equal(p(conv, images).input_ids, out.input_ids)


@pytest.mark.parametrize("ckpt", CKPTS)
def test_special_ids_from_tokenizer(processors, goldens, ckpt):
    ids = json.loads(str(goldens[ckpt]["meta_json"]))["special_token_ids"]
    p = processors[ckpt]
    assert (p.bos_id, p.eos_id, p.pad_id, p.image_token_id) == (ids["bos"], ids["eos"], ids["pad"], ids["image"])
    for tok in ["<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "<|User|>", "<|Assistant|>"]:
        assert p.tokenizer.token_to_id(tok) == ids[tok]


@pytest.mark.parametrize("ckpt", CKPTS)
def test_decode_matches_reference_text(processors, goldens, ckpt):
    p, z = processors[ckpt], goldens[ckpt]
    for case in CASES:
        assert p.decode(z[f"{case}__gen_tokens"], skip_special_tokens=False) == str(z[f"{case}__gen_text"])
    text = "<|ref|>cat<|/ref|><|det|>[[1,20,300,999]]<|/det|> hi"
    ids = [p.bos_id, *p.encode(text), p.eos_id, p.pad_id, p.image_token_id]
    assert p.decode(ids) == text  # grounding tags survive for parse_grounding
    assert p.decode(torch.tensor(ids), keep_grounding=False) == "cat[[1,20,300,999]] hi"  # the reference's decode
    assert p.decode(np.array(ids), skip_special_tokens=False).startswith("<｜begin▁of▁sentence｜><|ref|>cat")


def test_batch_equals_singles_after_unpadding(processors, goldens):
    p, z = processors["tiny_mha-seed1"], goldens["tiny_mha-seed1"]
    items = [load_case(z, c) for c in ("two_images_tiled", "text_only", "grounding_ref")]
    singles = [p.collate([p.prepare(c, i)]) for c, i in items]
    batch = p([c for c, _ in items], [i for _, i in items])
    T = batch.input_ids.shape[1]
    assert T == max(s.input_ids.shape[1] for s in singles)
    for b, s in enumerate(singles):
        n = s.input_ids.shape[1]
        assert (batch.input_ids[b, : T - n] == p.pad_id).all()
        assert not batch.attention_mask[b, : T - n].any() and not batch.images_seq_mask[b, : T - n].any()
        for f in ("input_ids", "attention_mask", "images_seq_mask"):
            assert torch.equal(getattr(batch, f)[b, T - n :], getattr(s, f)[0]), f
        k = s.images.shape[1]
        assert torch.equal(batch.images[b, :k], s.images[0]) and not batch.images[b, k:].any()
        m = s.images_spatial_crop.shape[1]
        assert torch.equal(batch.images_spatial_crop[b, :m], s.images_spatial_crop[0])
        assert not batch.images_spatial_crop[b, m:].any()
    assert batch.images.shape[:2] == (3, 6) and batch.images_spatial_crop.shape == (3, 2, 2)


def test_chat_format_tokens(processors):
    """System text raw after BOS, assistant history + EOS, final assistant EOS dropped."""
    p = processors["small_mla-seed1"]
    conv = [
        {"role": "system", "content": " Be brief. "},
        {"role": "<|User|>", "content": "Hi "},
        {"role": "<|Assistant|>", "content": " Hello."},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": ""},
    ]
    want = (
        [p.bos_id]
        + p.encode("Be brief.")
        + p.encode("<|User|>: Hi\n\n<|Assistant|>:")
        + p.encode("Hello.")
        + [p.eos_id]
        + p.encode("<|User|>: Again\n\n<|Assistant|>:")
    )
    assert p.prepare(conv).input_ids.tolist() == want
    # Ending on the user turn is the same prompt; a prefilled answer is kept without EOS.
    assert p.prepare(conv[:-1]).input_ids.tolist() == want
    assert p.prepare(conv[:-1] + [{"role": "<|Assistant|>", "content": "Sure"}]).input_ids.tolist() == want + p.encode("Sure")
    assert p.format_prompt(conv) == "system: Be brief.\n\n<|User|>: Hi<｜end▁of▁sentence｜><|Assistant|>: Hello.\n\nuser: Again<｜end▁of▁sentence｜>assistant:"


def test_bad_conversations(processors):
    p = processors["tiny_mha-seed1"]
    img = Image.new("RGB", (10, 10))
    with pytest.raises(ValueError, match="placeholders"):
        p.prepare([{"role": "<|User|>", "content": "<image> x"}], [])
    with pytest.raises(ValueError, match="placeholders"):
        p.prepare([{"role": "<|User|>", "content": "x"}], [img])
    with pytest.raises(ValueError, match="unknown role"):
        p.prepare([{"role": "bot", "content": "x"}])
    with pytest.raises(ValueError, match="first"):
        p.prepare([{"role": "<|User|>", "content": "x"}, {"role": "system", "content": "y"}])
    with pytest.raises(ValueError, match="assistant"):
        p.prepare([{"role": "<|User|>", "content": "x"}, {"role": "<|Assistant|>", "content": "<image>"}], [img])
    with pytest.raises(ValueError):
        p.collate([])


def test_numpy_roundtrip_and_to(processors, goldens):
    p = processors["tiny_mha-seed1"]
    prep = p.prepare(*load_case(goldens["tiny_mha-seed1"], "two_images_tiled"))
    d = prep.to_numpy_dict()
    assert all(isinstance(v, np.ndarray) for v in d.values())
    for v in d.values():
        v.flags.writeable = False  # as when read back from Ray's object store
    back = PreparedInput.from_numpy_dict(d)
    for f in ("input_ids", "images_seq_mask", "images", "images_spatial_crop", "num_image_tokens"):
        a, b = getattr(prep, f), getattr(back, f)
        assert a.dtype == b.dtype and torch.equal(a, b), f
    assert prep.num_image_tokens.tolist() == [421, 841]
    batch = p.collate([back]).to("cpu", dtype=torch.bfloat16)
    assert isinstance(batch, BatchInputs)
    assert batch.images.dtype == torch.bfloat16 and batch.input_ids.dtype == torch.long
    assert batch.attention_mask.dtype == torch.bool


def test_processor_pickles(processors):
    """Ray ships the processor to CPU workers by pickling it."""
    p = processors["small_mla-seed1"]
    q = pickle.loads(pickle.dumps(p))
    conv = [{"role": "<|User|>", "content": "<|grounding|>Find <|ref|>it<|/ref|>."}]
    assert torch.equal(q.prepare(conv).input_ids, p.prepare(conv).input_ids)
    assert q.decode(q.encode("<|det|>[[1,2,3,4]]<|/det|>")) == "<|det|>[[1,2,3,4]]<|/det|>"


def _copy_ckpt(src: Path, dst: Path, **config_overrides) -> Path:
    dst.mkdir()
    for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, dst / name)
    config = json.loads((src / "config.json").read_text())
    config.update(config_overrides)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("key,value", [("tile_tag", "1D"), ("global_view_pos", "tail")])
def test_rejects_unsupported_layout(fixtures_dir, tmp_path, key, value):
    d = _copy_ckpt(fixtures_dir / "tiny_mha-seed1", tmp_path / "ck", **{key: value})
    with pytest.raises(ValueError, match=f"{key}='{value}'"):
        Processor.from_pretrained(d)


def test_images_across_turns(processors):
    """Images are consumed in order over all user turns; the tiling decision counts them all."""
    p = processors["tiny_mha-seed1"]
    a, b, c = Image.new("RGB", (768, 384)), Image.new("RGB", (384, 768)), Image.new("RGB", (384, 384))
    two = [
        {"role": "<|User|>", "content": "<image> first"},
        {"role": "<|Assistant|>", "content": "ok"},
        {"role": "<|User|>", "content": "<image> second"},
        {"role": "<|Assistant|>", "content": ""},
    ]
    assert p.prepare(two, [a, b]).images_spatial_crop.tolist() == [[2, 1], [1, 2]]
    three = two[:2] + [{"role": "<|User|>", "content": "<image><image> more"}, two[3]]
    prep = p.prepare(three, [a, b, c])
    assert prep.images_spatial_crop.tolist() == [[1, 1]] * 3
    ids = prep.input_ids.tolist()
    assert ids.count(p.eos_id) == 1 and ids[ids.index(p.eos_id) - len(p.encode("ok")) : ids.index(p.eos_id)] == p.encode("ok")


def test_pack_unpack_is_exact_and_compact(fixtures_dir):
    """What crosses process boundaries in the pipeline: uint8 tiles that restore bit-for-bit."""
    proc = Processor.from_pretrained(fixtures_dir / "tiny_mha-seed1")
    z = np.load(fixtures_dir / "tiny_mha-seed1.golden.npz")
    img = Image.open(io.BytesIO(z["single_1000x400_rgba__image0_png"].tobytes()))
    conv = [{"role": "<|User|>", "content": "<image>\nRead it."}, {"role": "<|Assistant|>", "content": ""}]
    for prep in (proc.prepare(conv, [img]), proc.prepare([{"role": "<|User|>", "content": "hi"}])):
        packed = proc.pack(prep)
        back = proc.unpack(packed)
        for name in ("input_ids", "images_seq_mask", "images", "images_spatial_crop", "num_image_tokens"):
            assert torch.equal(getattr(back, name), getattr(prep, name)), name
    packed = proc.pack(proc.prepare(conv, [img]))
    assert packed["images_u8"].dtype == np.uint8 and "images" not in packed


def test_prepare_packed_is_pack_of_prepare(fixtures_dir):
    """The pipeline ships `prepare_packed` (tiles never normalized on the CPU actor): it unpacks to exactly
    `prepare`'s input, tiles included, and is what `pack(prepare(...))` gives."""
    proc = Processor.from_pretrained(fixtures_dir / "tiny_mha-seed1")
    z = np.load(fixtures_dir / "tiny_mha-seed1.golden.npz")
    img = Image.open(io.BytesIO(z["single_1000x400_rgba__image0_png"].tobytes()))
    small = Image.new("RGB", (160, 120), (200, 30, 90))
    cases = [([{"role": "<|User|>", "content": "<image>\nRead it."}, {"role": "<|Assistant|>", "content": ""}], [img]),
             ([{"role": "<|User|>", "content": "<image> and <image>"}, {"role": "<|Assistant|>", "content": ""}],
              [img, small]),
             ([{"role": "<|User|>", "content": "hi"}, {"role": "<|Assistant|>", "content": ""}], [])]
    for conv, images in cases:
        prep = proc.prepare(conv, images)
        packed = proc.prepare_packed(conv, images)
        want = proc.pack(prep)
        assert sorted(packed) == sorted(want)
        for k in want:
            assert packed[k].dtype == want[k].dtype and np.array_equal(packed[k], want[k]), k
        back = proc.unpack(packed)
        for name in ("input_ids", "images_seq_mask", "images", "images_spatial_crop", "num_image_tokens"):
            assert torch.equal(getattr(back, name), getattr(prep, name)), name
