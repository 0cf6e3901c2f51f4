"""Tiny model builders shared across notebooks.

Conditional models take `forward(x, t, y)`: `x` of any per-sample shape, `t` a float tensor (B,) in the
model's own time units (integer DDPM steps, or flow time in [0, 1] with `t_scale=1000`), and labels `y`
(B,) where `null_label` (= n_classes) means "no condition" (label dropout during training).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class SinusoidalEmbedding(nn.Module):
    """Transformer-style features of a scalar time, $[\\cos(s t f_k), \\sin(s t f_k)]$."""

    def __init__(self, dim: int, scale: float = 1.0, max_period: float = 10_000.0):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(max_period) * torch.arange(half) / half), persistent=False)
        self.scale = scale

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        a = self.scale * t.float()[:, None] * self.freqs[None]
        return torch.cat([a.cos(), a.sin()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 2 * hidden), nn.SiLU(),
                                 nn.Linear(2 * hidden, hidden))

    def forward(self, h, emb):
        return h + self.net(h + emb)


class MLPDenoiser(nn.Module):
    """Class-conditional residual MLP for small inputs (8x8 digits, 40-d signals, 2-D points).

    Output has the input's shape: an eps / v / x0 prediction or a flow velocity, as it was trained.
    """

    def __init__(self, dim: int, n_classes: int, hidden: int = 256, depth: int = 3, t_scale: float = 1.0):
        super().__init__()
        self.dim, self.n_classes, self.null_label = dim, n_classes, n_classes
        self.time = nn.Sequential(SinusoidalEmbedding(hidden, t_scale), nn.Linear(hidden, hidden), nn.SiLU(),
                                  nn.Linear(hidden, hidden))
        self.label = nn.Embedding(n_classes + 1, hidden)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(ResBlock(hidden) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, dim))
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)

    def forward(self, x, t, y):
        emb = self.time(t) + self.label(y)
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h).view_as(x)


class UNetDenoiser(nn.Module):
    """diffusers' `UNet2DModel` with class embeddings, behind the same `forward(x, t, y)` (paper scale)."""

    def __init__(self, sample_size: int = 8, n_classes: int = 10, channels: tuple = (32, 64), layers: int = 1,
                 attention: bool = False):
        super().__init__()
        from diffusers import UNet2DModel  # heavy import, only when a UNet is asked for

        down = ["DownBlock2D"] * len(channels)
        up = ["UpBlock2D"] * len(channels)
        if attention:
            down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
        self.n_classes, self.null_label = n_classes, n_classes
        self.net = UNet2DModel(sample_size=sample_size, in_channels=1, out_channels=1,
                               block_out_channels=tuple(channels), layers_per_block=layers,
                               down_block_types=tuple(down), up_block_types=tuple(up),
                               norm_num_groups=min(8, channels[0]), num_class_embeds=n_classes + 1)

    def forward(self, x, t, y):
        return self.net(x, t, class_labels=y).sample


class Classifier(nn.Module):
    """An MLP (or 1-D CNN for sequences) classifier with a `features` method for Frechet distances."""

    def __init__(self, dim: int, n_classes: int, hidden: int = 128, feature_dim: int = 64, conv: bool = False):
        super().__init__()
        if conv:  # for 1-D signals: two strided convolutions, then an MLP head
            self.body = nn.Sequential(
                nn.Unflatten(1, (1, dim)), nn.Conv1d(1, 32, 5, padding=2), nn.GELU(),
                nn.Conv1d(32, 32, 5, stride=2, padding=2), nn.GELU(), nn.Conv1d(32, 32, 5, stride=2, padding=2),
                nn.GELU(), nn.Flatten(), nn.Linear(32 * math.ceil(math.ceil(dim / 2) / 2), feature_dim), nn.GELU())
        else:
            self.body = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, feature_dim), nn.GELU())
        self.head = nn.Linear(feature_dim, n_classes)
        self.dim = dim

    def features(self, x):
        return self.body(x.flatten(1))

    def forward(self, x):
        return self.head(self.features(x))
