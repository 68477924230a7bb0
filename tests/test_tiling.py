"""Tiling: best-resolution choice, tile counts vs placeholder counts, PIL modes."""
import numpy as np
import pytest
import torch
from PIL import Image

from model.processor import Processor
from model.tiling import image_token_count, normalize, select_best_resolution, tile_image, to_rgb

# The 23 official candidates: {(384m, 384n): m*n <= 9} in the reference order.
CANDIDATES = [
    (384, 384), (384, 768), (768, 384), (384, 1152), (1152, 384), (384, 1536), (1536, 384), (768, 768),
    (384, 1920), (1920, 384), (384, 2304), (2304, 384), (768, 1152), (1152, 768), (384, 2688), (2688, 384),
    (384, 3072), (3072, 384), (768, 1536), (1536, 768), (384, 3456), (3456, 384), (1152, 1152),
]  # fmt: skip


@pytest.fixture(scope="module")
def processor(fixtures_dir):
    return Processor.from_pretrained(fixtures_dir / "tiny_mha-seed1")


@pytest.mark.parametrize(
    "size,best",
    [((640, 480), (768, 768)), ((1024, 768), (1152, 768)), ((1000, 1000), (1152, 1152)), ((1920, 1080), (1536, 768))],
)
def test_best_resolution_doc_examples(size, best):
    assert select_best_resolution(size, CANDIDATES) == best


def test_best_resolution_ties():
    # Every candidate keeps all of a 1x1 image: least waste wins.
    assert select_best_resolution((1, 1), CANDIDATES) == (384, 384)
    # Equal effective area and equal waste: the earlier candidate wins (strict comparisons).
    assert select_best_resolution((100, 100), [(384, 768), (768, 384)]) == (384, 768)
    assert select_best_resolution((100, 100), [(768, 384), (384, 768)]) == (768, 384)
    assert select_best_resolution((300, 10000), CANDIDATES) == (384, 3456)
    assert select_best_resolution((10000, 300), CANDIDATES) == (3456, 384)
    with pytest.raises(ValueError):
        select_best_resolution((0, 10), CANDIDATES)


SIZES = [(1, 1), (1, 384), (383, 385), (384, 384), (385, 384), (300, 200), (380, 1100), (1000, 400),
         (2000, 1500), (4000, 50), (50, 4000), (10000, 300), (300, 10000)]  # fmt: skip


@pytest.mark.parametrize("size", SIZES)
def test_tile_counts_and_tokens(size):
    img = Image.new("RGB", size, (200, 10, 30))
    tiles, (nw, nh) = tile_image(img, CANDIDATES, cropping=True)
    assert (nw * 384, nh * 384) == select_best_resolution(size, CANDIDATES)
    assert len(tiles) == 1 + nw * nh and 1 <= nw * nh <= 9
    assert all(t.size == (384, 384) and t.mode == "RGB" for t in tiles)
    assert image_token_count(nw, nh) == 211 + 14 * nh * (14 * nw + 1)
    assert image_token_count(nw, nh) <= 2101


def test_token_counts_known_values():
    assert [image_token_count(1, 1), image_token_count(2, 2), image_token_count(3, 3), image_token_count(1, 9)] == [
        421, 1023, 2017, 2101,
    ]


def test_prepare_counts_consistent(processor):
    """Placeholders and tiles agree per image, two tiled images in one conversation."""
    imgs = [Image.new("RGB", (10000, 300)), Image.new("RGB", (300, 10000))]
    prep = processor.prepare([{"role": "<|User|>", "content": "<image><image>"}, {"role": "<|Assistant|>", "content": ""}], imgs)
    crops = prep.images_spatial_crop.tolist()
    assert crops == [[9, 1], [1, 9]]
    assert prep.images.shape[0] == sum(1 + w * h for w, h in crops)
    assert prep.num_image_tokens.tolist() == [image_token_count(w, h) for w, h in crops]
    assert int(prep.images_seq_mask.sum()) == int(prep.num_image_tokens.sum())
    assert int((prep.input_ids == processor.image_token_id).sum()) == int(prep.num_image_tokens.sum())


def test_three_or_more_images_not_tiled(processor):
    imgs = [Image.new("RGB", (2000, 1500), (i * 50, 0, 0)) for i in range(4)]
    conv = [{"role": "<|User|>", "content": "<image>" * 4 + "which?"}]
    prep = processor.prepare(conv, imgs)
    assert prep.images_spatial_crop.tolist() == [[1, 1]] * 4
    assert prep.images.shape[0] == 8
    assert torch.equal(prep.images[0], prep.images[1])  # the 1x1 "local" tile is the global view
    assert prep.num_image_tokens.tolist() == [421] * 4
    # Two images: tiled again.
    prep2 = processor.prepare([{"role": "<|User|>", "content": "<image><image>"}], imgs[:2])
    assert prep2.images_spatial_crop.tolist() == [[3, 3], [3, 3]]


def test_untiled_single_tile_is_padded_global_view():
    img = Image.new("RGB", (768, 384), (255, 255, 255))
    tiles, grid = tile_image(img, CANDIDATES, cropping=False)
    assert grid == (1, 1) and len(tiles) == 2
    a = np.asarray(tiles[1])
    assert (a[:96] == 127).all() and (a[96:288] == 255).all() and (a[288:] == 127).all()  # letterboxed, fill 127


def test_local_tiles_row_major():
    # Left half black, right half white, 768x384 -> best 768x384: tile 1 black, tile 2 white.
    arr = np.zeros((384, 768, 3), np.uint8)
    arr[:, 384:] = 255
    tiles, grid = tile_image(Image.fromarray(arr), CANDIDATES, cropping=True)
    assert grid == (2, 1)
    assert (np.asarray(tiles[1]) == 0).all() and (np.asarray(tiles[2]) == 255).all()


def test_normalize_values():
    img = Image.fromarray(np.array([[[0, 127, 255]]], np.uint8))
    x = normalize(img)
    assert x.dtype == torch.float32 and x.shape == (3, 1, 1)
    assert x.flatten().tolist() == pytest.approx([-1.0, 127 / 255 * 2 - 1, 1.0], abs=1e-7)


def _make(mode: str, size=(50, 30)) -> Image.Image:
    rng = np.random.default_rng(0)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16))  # -> "I;16"
    if mode == "I":
        return Image.fromarray(rng.integers(-100, 1000, size[::-1], dtype=np.int32))
    if mode == "F":
        return Image.fromarray(rng.uniform(-10, 300, size[::-1]).astype(np.float32))
    base = Image.fromarray(rng.integers(0, 256, (*size[::-1], 4), dtype=np.uint8), mode="RGBA")
    if mode in ("P", "PA"):
        p = base.convert("RGB").quantize(16)
        return p if mode == "P" else p.convert("PA")
    return base.convert(mode)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I", "F", "I;16"])
def test_every_mode_is_converted_like_the_reference(mode):
    img = _make(mode)
    assert img.mode == mode
    tiles, _ = tile_image(img, CANDIDATES, cropping=True)
    ref_tiles, _ = tile_image(img.convert("RGB"), CANDIDATES, cropping=True)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(tiles, ref_tiles))
    assert to_rgb(img).mode == "RGB"


def test_unconvertible_mode_raises_clear_error():
    # Pillow cannot convert premultiplied "La" to RGB; we say so rather than guess.
    img = Image.new("La", (4, 4))
    with pytest.raises(ValueError, match="'La'"):
        to_rgb(img)
