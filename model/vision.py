"""SigLIP-so400m vision tower and the downsample-MLP projector.

Module names follow the checkpoint's `vision.*` / `projector.*` keys (timm layout), so loading is
a name-for-name copy. Only `forward_features` is used: the attention-pool head is never run.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .config import ProjectorConfig, VisionConfig
from .language import _runs


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [N, P, C]


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=True)
        self.proj = nn.Linear(width, width, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, p, c = x.shape
        q, k, v = self.qkv(x).view(n, p, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(n, p, c))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.float32 and _cpu_linear_gelu():
            # oneDNN's linear with the tanh GELU as a post-op: one pass instead of addmm, a bias copy and
            # ATen's slow tanh-GELU kernel (7 tiles of the mini: 0.77 vs 1.8 ms; within 3e-7)
            h = torch.ops.mkldnn._linear_pointwise(x, self.fc1.weight, self.fc1.bias, "gelu", [None], "tanh")
        else:
            h = F.gelu(self.fc1(x), approximate="tanh")
        return self.fc2(h)


@functools.cache
def _cpu_linear_gelu() -> bool:
    """Whether this torch has oneDNN's fused linear + pointwise op on CPU (builds with mkldnn do)."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    x, w = torch.ones(2, 4), torch.ones(3, 4)
    return op is not None and _runs(lambda: op(x, w, torch.zeros(3), "gelu", [None], "tanh").shape == (2, 3))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = Attention(cfg.width, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = Mlp(cfg.width, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid * cfg.grid, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class Projector(nn.Module):
    """2x2 token merge then MLP; the merge uses F.unfold, whose channel-major feature order
    (c*4 + ki*2 + kj) is what the checkpoint's first linear layer expects."""

    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.ratio = cfg.downsample_ratio
        # like the reference, depth 1 and depth 2 both give two linear layers
        dims = [cfg.input_dim * cfg.downsample_ratio**2] + [cfg.n_embed * cfg.mlp_ratio] * max(cfg.depth - 1, 1)
        layers: list[nn.Module] = []
        for a, b in zip(dims, dims[1:] + [cfg.n_embed]):
            layers += [nn.Linear(a, b), nn.GELU()]
        self.layers = nn.Sequential(*layers[:-1])  # keys layers.0, layers.2, …

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, hw, c = x.shape
        side = int(hw**0.5)
        pad = -side % self.ratio
        x = x.view(n, side, side, c)
        if pad:
            x = F.pad(x, (0, 0, 0, pad, 0, pad))
        x = F.unfold(x.permute(0, 3, 1, 2), kernel_size=self.ratio, stride=self.ratio)
        return self.layers(x.transpose(1, 2))
