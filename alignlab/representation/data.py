"""Data for the representation family: tabular sets shipped by sklearn, graded image corruptions, and the
split builders (class-incremental tasks, long-tailed subsampling, label noise, federated clients: Dirichlet
or FedAvg's pathological shards).

Images are sklearn digits from `alignlab.data.digits`: (N, 1, 8, 8) in [-1, 1] with the shared fixed split.
Every random function takes a `seed` and draws from its own generator.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

TABULAR = ("wine", "breast_cancer", "digits", "iris", "blobs")
CORRUPTIONS = ("noise", "rotate", "blur", "contrast", "shift")


def tabular(name: str, seed: int = 0, standardize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, d) float32 and labels (N,) of a small sklearn set; `blobs` are 4 anisotropic Gaussian
    blobs (600 points, 2-D, sheared as in sklearn's k-means demo). Standardised per feature by default."""
    from sklearn import datasets

    if name == "blobs":
        x, y = datasets.make_blobs(n_samples=600, centers=4, cluster_std=[1.0, 1.5, 0.7, 1.2], random_state=seed)
        x = x @ np.array([[0.6, -0.64], [-0.41, 0.85]])
    elif name in TABULAR:
        d = getattr(datasets, f"load_{name}")()
        x, y = d.data, d.target
    else:
        raise ValueError(f"unknown tabular set {name!r}; valid: {TABULAR}")
    x = np.asarray(x, dtype=np.float64)
    if standardize:
        x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


def corrupt(x: torch.Tensor, kind: str, severity: int, seed: int = 0) -> torch.Tensor:
    """A corrupted copy of images `x` (N, C, H, W) in [-1, 1]; severity 0 (none) .. 5 (strongest).

    noise: + N(0, s^2) with s = 0.15 severity; rotate: by +-(8 severity) degrees (random sign per image);
    blur: Gaussian kernel with sigma = 0.25 severity; contrast: (x - mean) (1 - 0.17 severity) + mean;
    shift: translated by `severity` / 2 pixels in a random direction (bilinear, zero padding = -1)."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; valid: {CORRUPTIONS}")
    if not 0 <= severity <= 5:
        raise ValueError(f"severity must be in 0..5, got {severity}")
    if severity == 0:
        return x.clone()
    g = torch.Generator().manual_seed(seed)
    n = len(x)
    if kind == "noise":
        out = x + 0.15 * severity * torch.randn(x.shape, generator=g)
    elif kind == "contrast":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        out = (x - mean) * (1 - 0.17 * severity) + mean
    elif kind == "blur":
        sigma = 0.25 * severity
        r = torch.arange(-2, 3, dtype=x.dtype)
        k = torch.exp(-r ** 2 / (2 * sigma ** 2))
        k = k / k.sum()
        c = x.shape[1]
        out = F.pad(x + 1, (2, 2, 2, 2))  # zero padding in the [0, 2] range = background -1
        out = F.conv2d(out, k.view(1, 1, 1, 5).repeat(c, 1, 1, 1), groups=c)
        out = F.conv2d(out, k.view(1, 1, 5, 1).repeat(c, 1, 1, 1), groups=c) - 1
    else:
        if kind == "rotate":
            sign = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
            a = sign * math.radians(8 * severity)
            theta = torch.stack([torch.stack([a.cos(), -a.sin(), torch.zeros(n)], 1),
                                 torch.stack([a.sin(), a.cos(), torch.zeros(n)], 1)], 1)
        else:  # shift, in normalised coordinates: one pixel = 2 / width
            phi = 2 * math.pi * torch.rand(n, generator=g)
            d = severity / 2 * 2 / x.shape[-1]
            eye = torch.eye(2).expand(n, 2, 2)
            theta = torch.cat([eye, torch.stack([d * phi.cos(), d * phi.sin()], 1).unsqueeze(-1)], 2)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        out = F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1
    return out.clamp(-1.5, 1.5)


def class_incremental(y: torch.Tensor, classes_per_task: int | Sequence[int],
                      order: Sequence[int] | None = None) -> list[tuple[list[int], torch.Tensor]]:
    """Split the classes into consecutive tasks: [(classes of task t, indices of their samples), ...].
    `classes_per_task` is a size per task or one size for all; `order` permutes the classes first."""
    classes = list(order) if order is not None else sorted(torch.unique(y).tolist())
    sizes = [classes_per_task] * math.ceil(len(classes) / classes_per_task) if isinstance(classes_per_task, int) \
        else list(classes_per_task)
    if sum(sizes) != len(classes) or min(sizes) < 1:
        raise ValueError(f"task sizes {sizes} do not partition the {len(classes)} classes")
    tasks, start = [], 0
    for s in sizes:
        cls = classes[start:start + s]
        tasks.append((cls, torch.nonzero(torch.isin(y, torch.tensor(cls))).flatten()))
        start += s
    return tasks


def long_tail(y: torch.Tensor, imb_factor: float, seed: int = 0, n_max: int | None = None) -> torch.Tensor:
    """Indices of an exponentially long-tailed subset: class c (in label order) keeps
    n_c = n_max * imb_factor^(-c / (C - 1)) samples, so the head/tail ratio is `imb_factor`."""
    if imb_factor < 1:
        raise ValueError(f"imb_factor must be >= 1, got {imb_factor}")
    g = torch.Generator().manual_seed(seed)
    classes = sorted(torch.unique(y).tolist())
    counts = torch.bincount(y)
    n_max = int(n_max or counts[classes].min())
    keep = []
    for i, c in enumerate(classes):
        n_c = max(1, round(n_max * imb_factor ** (-i / max(1, len(classes) - 1))))
        idx = torch.nonzero(y == c).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=g)[:n_c]])
    return torch.cat(keep).sort().values


def label_noise(y: torch.Tensor, rate: float, n_classes: int | None = None, kind: str = "symmetric",
                seed: int = 0) -> torch.Tensor:
    """Noisy labels: a fraction `rate` of the samples get a different label, uniform over the other classes
    ("symmetric") or the next class c + 1 mod C ("pair")."""
    if not 0 <= rate <= 1:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    if kind not in ("symmetric", "pair"):
        raise ValueError(f"kind must be 'symmetric' or 'pair', got {kind!r}")
    n_classes = n_classes or int(y.max()) + 1
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(y), generator=g) < rate
    step = torch.randint(1, n_classes, (len(y),), generator=g) if kind == "symmetric" else torch.ones_like(y)
    return torch.where(flip, (y + step) % n_classes, y)


def dirichlet_clients(y: torch.Tensor, n_clients: int, alpha: float, seed: int = 0,
                      min_size: int = 10) -> list[torch.Tensor]:
    """Federated label skew: each class's samples are shared among clients in proportions ~ Dir(alpha);
    redrawn until every client holds at least `min_size` samples. Small alpha = more skew."""
    if alpha <= 0 or n_clients < 1:
        raise ValueError("alpha must be > 0 and n_clients >= 1")
    rng = np.random.default_rng(seed)
    yn = y.numpy()
    for _ in range(100):
        parts = [[] for _ in range(n_clients)]
        for c in np.unique(yn):
            idx = rng.permutation(np.flatnonzero(yn == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * n_clients)) * len(idx)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [torch.tensor(sorted(p), dtype=torch.long) for p in parts]
    raise ValueError(f"no split with >= {min_size} samples per client after 100 draws; lower min_size")


def pathological_clients(y: torch.Tensor, n_clients: int, classes_per_client: int, seed: int = 0) -> list[torch.Tensor]:
    """Federated label skew as in FedAvg's "pathological non-IID" split: the samples, sorted by label, are cut
    into n_clients * classes_per_client equal shards and each client gets `classes_per_client` random shards
    (so it sees at most that many classes)."""
    n_shards = n_clients * classes_per_client
    if n_clients < 1 or classes_per_client < 1 or n_shards > len(y):
        raise ValueError("need n_clients >= 1, classes_per_client >= 1 and at most one shard per sample")
    g = torch.Generator().manual_seed(seed)
    order = torch.argsort(y * len(y) + torch.randperm(len(y), generator=g))  # by label, random within a label
    shards = torch.tensor_split(order, n_shards)
    pick = torch.randperm(n_shards, generator=g).view(n_clients, classes_per_client)
    return [torch.cat([shards[int(s)] for s in row]).sort().values for row in pick]
