"""DeepSeek-VL2 dynamic tiling: one padded global view plus a grid of 384px local tiles.

Everything here must reproduce the reference processor pixel for pixel, so the PIL calls
(ImageOps.pad, BICUBIC, fill = int(mean*255)) and the float32 order of operations
(u8 / 255, then (x - mean) / std) are deliberate.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

Size = tuple[int, int]  # (width, height), PIL order

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def select_best_resolution(image_size_wh: Size, candidates: Sequence[Sequence[int]]) -> Size:
    """Pick the candidate (W, H) that keeps the most source pixels, then wastes the least.

    Comparisons are strict, so on a full tie the earlier candidate wins, as in the reference.
    Upscaling counts: a tiny image keeps all its pixels in every candidate, so the least
    wasteful (the first, 384x384) wins.
    """
    w, h = image_size_wh
    if w <= 0 or h <= 0:
        raise ValueError(f"image size must be positive, got {w}x{h}")
    best: Size | None = None
    best_eff, best_waste = 0, math.inf
    for cw, ch in candidates:
        scale = min(cw / w, ch / h)
        eff = min(int(w * scale) * int(h * scale), w * h)
        waste = cw * ch - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(cw), int(ch)), eff, waste
    if best is None:
        raise ValueError("no candidate resolutions")
    return best


def to_rgb(img: Image.Image) -> Image.Image:
    """The reference feeds `img.convert("RGB")`; alpha is dropped, not composited."""
    if img.width <= 0 or img.height <= 0:
        raise ValueError(f"empty image ({img.width}x{img.height})")
    if img.mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except ValueError as e:  # e.g. premultiplied "La": Pillow has no direct path to RGB
        raise ValueError(f"cannot convert image mode {img.mode!r} to RGB: {e}") from e


def fill_color(mean: Sequence[float] = MEAN) -> tuple[int, ...]:
    return tuple(int(m * 255) for m in mean)


def tile_image(
    img: Image.Image,
    candidates: Sequence[Sequence[int]],
    cropping: bool,
    image_size: int = 384,
    mean: Sequence[float] = MEAN,
) -> tuple[list[Image.Image], Size]:
    """Return [global, local tiles row-major] and (num_width_tiles, num_height_tiles).

    Without cropping (conversations with >= 3 images) the "local" view is a single tile,
    identical to the global view, exactly as the reference produces it.
    """
    img = to_rgb(img)
    best_w, best_h = select_best_resolution(img.size, candidates) if cropping else (image_size, image_size)
    color = fill_color(mean)
    global_view = ImageOps.pad(img, (image_size, image_size), color=color)
    if (best_w, best_h) == (image_size, image_size):
        local_view = global_view
    else:
        local_view = ImageOps.pad(img, (best_w, best_h), color=color)
    tiles = [global_view]
    for top in range(0, best_h, image_size):
        for left in range(0, best_w, image_size):
            tiles.append(local_view.crop((left, top, left + image_size, top + image_size)))
    return tiles, (best_w // image_size, best_h // image_size)


def normalize(tile: Image.Image, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> torch.Tensor:
    """RGB PIL tile -> float32 [3, H, W], same arithmetic as ToTensor + Normalize."""
    x = torch.from_numpy(np.asarray(tile, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return x.sub(m).div(s)


def image_token_count(num_w: int, num_h: int, tokens_per_side: int = 14) -> int:
    """Placeholders for one image: global rows with a newline each, 1 view separator,
    then the local grid as one (side*num_h) x (side*num_w) map with a newline per row."""
    n = tokens_per_side
    return n * (n + 1) + 1 + (n * num_h) * (n * num_w + 1)
