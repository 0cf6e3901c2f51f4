"""Class statistics of features: means, Gaussians (per class or shared covariance), samples from them,
Mahalanobis distances and cosines to the class means."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_means(feats: torch.Tensor, y: torch.Tensor, n_classes: int | None = None) -> torch.Tensor:
    """(C, d) mean feature of each class (zeros for classes with no sample)."""
    n_classes = n_classes or int(y.max()) + 1
    sums = torch.zeros(n_classes, feats.shape[1], dtype=feats.dtype).index_add_(0, y, feats)
    counts = torch.bincount(y, minlength=n_classes).clamp_min(1).unsqueeze(1)
    return sums / counts


def class_gaussians(feats: torch.Tensor, y: torch.Tensor, n_classes: int | None = None, shared: bool = False,
                    shrink: float = 0.1) -> dict:
    """Per-class Gaussians N(mu_c, Sigma_c) of features, or one shared (pooled within-class) Sigma.

    Covariances are shrunk towards a scaled identity: (1 - shrink) S + shrink tr(S)/d I, so they stay
    invertible for classes with fewer samples than dimensions. Returns mean (C, d), cov (C, d, d) or (d, d),
    count (C,)."""
    n_classes = n_classes or int(y.max()) + 1
    mu = class_means(feats, y, n_classes)
    d = feats.shape[1]
    eye = torch.eye(d, dtype=feats.dtype)

    def shrunk(s):
        return (1 - shrink) * s + shrink * torch.diagonal(s).mean() * eye

    centred = feats - mu[y]
    count = torch.bincount(y, minlength=n_classes)
    if shared:
        cov = shrunk(centred.T @ centred / max(1, len(y) - n_classes))
    else:
        cov = torch.stack([shrunk(centred[y == c].T @ centred[y == c] / max(1, int(count[c]) - 1))
                           for c in range(n_classes)])
    return {"mean": mu, "cov": cov, "count": count}


def sample_gaussians(stats: dict, n_per_class: int, classes=None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw `n_per_class` features from each class Gaussian of `class_gaussians` (all classes by default)."""
    g = torch.Generator().manual_seed(seed)
    classes = range(len(stats["mean"])) if classes is None else classes
    xs, ys = [], []
    for c in classes:
        cov = stats["cov"] if stats["cov"].dim() == 2 else stats["cov"][c]
        chol = torch.linalg.cholesky(cov)
        z = torch.randn(n_per_class, cov.shape[0], generator=g, dtype=cov.dtype)
        xs.append(stats["mean"][c] + z @ chol.T)
        ys.append(torch.full((n_per_class,), c, dtype=torch.long))
    return torch.cat(xs), torch.cat(ys)


def mahalanobis(z: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """(N, C) squared distances (z - mu_c)^T Sigma_c^{-1} (z - mu_c); `cov` is (d, d) shared or (C, d, d)."""
    diff = z.unsqueeze(1) - mean.unsqueeze(0)  # N, C, d
    prec = torch.linalg.inv(cov)
    if prec.dim() == 2:
        return torch.einsum("ncd,de,nce->nc", diff, prec, diff)
    return torch.einsum("ncd,cde,nce->nc", diff, prec, diff)


def cosine_to_means(feats: torch.Tensor, y: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Cosine of each feature to the mean of its own class: cos(f_i, mu_{y_i})."""
    return F.cosine_similarity(feats, means[y], dim=1)
