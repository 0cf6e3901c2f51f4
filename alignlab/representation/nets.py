"""Small backbones with a separate linear head (`features(x)` then `head`), and heads for the family:
an expanding head for class-incremental learning and fixed (non-trained) classifiers such as the simplex ETF."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


class Backbone(nn.Module):
    """A feature extractor `body` (to `feature_dim` features) followed by a linear `head`; subclasses build both."""

    body: nn.Module
    head: nn.Module
    feature_dim: int

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MLP(Backbone):
    """Flatten, then Linear (+ BatchNorm) + ReLU blocks of `widths`; the last width is the feature dimension.
    `head` is a Linear to `n_classes` (or any module set later)."""

    def __init__(self, in_dim: int, widths: Sequence[int] = (128, 64), n_classes: int = 10, bn: bool = False):
        super().__init__()
        layers, d = [nn.Flatten()], in_dim
        for w in widths:
            layers += [nn.Linear(d, w), *([nn.BatchNorm1d(w)] if bn else []), nn.ReLU()]
            d = w
        self.body = nn.Sequential(*layers)
        self.feature_dim = d
        self.head = nn.Linear(d, n_classes)


class SmallCNN(Backbone):
    """For 8x8 digit images (N, 1, 8, 8): two 3x3 convolutions (+ BatchNorm) with a 2x2 pool between, then a
    Linear to `emb_dim` features."""

    def __init__(self, in_ch: int = 1, width: int = 16, emb_dim: int = 64, n_classes: int = 10, side: int = 8,
                 bn: bool = True):
        super().__init__()

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1), *([nn.BatchNorm2d(c_out)] if bn else []), nn.ReLU()]

        self.body = nn.Sequential(*block(in_ch, width), nn.MaxPool2d(2), *block(width, 2 * width), nn.Flatten(),
                                  nn.Linear(2 * width * (side // 2) ** 2, emb_dim), nn.ReLU())
        self.feature_dim = emb_dim
        self.head = nn.Linear(emb_dim, n_classes)


class Conv1DNet(Backbone):
    """For MNIST-1D signals (N, L): three strided 1-D convolutions, then a Linear to `emb_dim` features."""

    def __init__(self, length: int = 40, width: int = 32, emb_dim: int = 64, n_classes: int = 10):
        super().__init__()
        conv = []
        c_in, n = 1, length
        for _ in range(3):
            conv += [nn.Conv1d(c_in, width, 5, stride=2, padding=2), nn.BatchNorm1d(width), nn.ReLU()]
            c_in, n = width, math.ceil(n / 2)
        self.body = nn.Sequential(nn.Unflatten(1, (1, length)), *conv, nn.Flatten(), nn.Linear(width * n, emb_dim),
                                  nn.ReLU())
        self.feature_dim = emb_dim
        self.head = nn.Linear(emb_dim, n_classes)


class ExpandingHead(nn.Module):
    """A linear classifier that grows: `add_classes(n)` appends n fresh output rows and keeps the old ones."""

    def __init__(self, dim: int, n_classes: int = 0):
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.zeros(0, dim))
        self.bias = nn.Parameter(torch.zeros(0))
        if n_classes:
            self.add_classes(n_classes)

    @property
    def n_classes(self) -> int:
        return self.weight.shape[0]

    def add_classes(self, n_new: int) -> None:
        fresh = nn.Linear(self.dim, n_new)
        self.weight = nn.Parameter(torch.cat([self.weight.data, fresh.weight.data.to(self.weight)]))
        self.bias = nn.Parameter(torch.cat([self.bias.data, fresh.bias.data.to(self.bias)]))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.weight.T + self.bias


class FixedLinear(nn.Module):
    """A classifier z -> z W^T with a frozen weight (a buffer, never trained), e.g. `simplex_etf`."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.clone())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.weight.T


def simplex_etf(n_classes: int, dim: int, seed: int = 0) -> torch.Tensor:
    """(C, d) simplex equiangular tight frame: unit rows with pairwise cosine -1/(C-1), placed in a random
    (C-1)-dimensional subspace of R^d, so any d >= C - 1 works (d = C - 1 is the fixed "d-simplex" classifier).
    The Gram matrix is M = C/(C-1) (I - 11^T/C); its rank-(C-1) square root gives the rows."""
    if n_classes < 2 or dim < n_classes - 1:
        raise ValueError(f"a simplex of {n_classes} classes needs n_classes >= 2 and dim >= {n_classes - 1}, got {dim}")
    c = n_classes
    gram = c / (c - 1) * (torch.eye(c, dtype=torch.float64) - 1.0 / c)
    evals, evecs = torch.linalg.eigh(gram)                       # one zero eigenvalue (the all-ones direction)
    roots = evecs[:, 1:] * evals[1:].clamp_min(0).sqrt()         # C x (C-1), roots @ roots.T = gram
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, c - 1, generator=g, dtype=torch.float64))
    return (roots @ basis.T).float()
