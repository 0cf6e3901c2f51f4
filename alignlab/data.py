"""Small data sets, all shipped by packages or generated: nothing is downloaded.

- `digits`: sklearn's 8x8 handwritten digits (1797 images), scaled to [-1, 1], with a fixed stratified
  train/test split shared by every notebook (generators train on "train", evaluators test on "test").
- `ring_mixture`: labelled 2-D Gaussian mixtures on a circle.
- `mnist1d`: Greydanus' procedural 1-D digits (40 samples long), built by `mnist1d.data.make_dataset`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_SPLITS = ("train", "test", "all")


def digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 8, 8) in [-1, 1] and labels (N,). The split (75/25, stratified) is fixed."""
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {_SPLITS}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images / 8.0 - 1.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.long)
    if split == "all":
        return x, y
    tr, te = train_test_split(np.arange(len(y)), test_size=0.25, stratify=d.target, random_state=0)
    idx = torch.as_tensor(tr if split == "train" else te)
    return x[idx], y[idx]


def ring_mixture(n: int, n_modes: int = 8, n_classes: int | None = None, radius: float = 2.0, std: float = 0.15,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` points from `n_modes` Gaussians evenly spaced on a circle; label = mode index mod n_classes."""
    if n_modes < 1 or n < 1:
        raise ValueError("n and n_modes must be >= 1")
    n_classes = n_modes if n_classes is None else n_classes
    mode = torch.randint(0, n_modes, (n,), generator=generator)
    angle = 2 * math.pi * mode.float() / n_modes
    centers = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    return centers + std * torch.randn(n, 2, generator=generator), mode % n_classes


def ring_centers(n_modes: int = 8, radius: float = 2.0) -> torch.Tensor:
    angle = 2 * math.pi * torch.arange(n_modes).float() / n_modes
    return radius * torch.stack([angle.cos(), angle.sin()], dim=1)


def mnist1d(n: int = 5000, seed: int = 42) -> dict[str, torch.Tensor]:
    """MNIST-1D, generated (never downloaded): x_train/x_test (N, 40) standardised with the train statistics,
    y_train/y_test. 80/20 split as in the reference generator. Cached: generating 5000 signals takes ~2 s."""
    from .cache import load_or_build

    return load_or_build("mnist1d", {"n": n, "seed": seed}, lambda: _make_mnist1d(n, seed), code=(_make_mnist1d,))


def _make_mnist1d(n: int, seed: int) -> dict[str, torch.Tensor]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = n, seed
    d = make_dataset(args)
    xtr = torch.tensor(d["x"], dtype=torch.float32)
    xte = torch.tensor(d["x_test"], dtype=torch.float32)
    mu, sd = xtr.mean(), xtr.std()
    return {"x_train": (xtr - mu) / sd, "y_train": torch.tensor(d["y"]).long(),
            "x_test": (xte - mu) / sd, "y_test": torch.tensor(d["y_test"]).long()}
