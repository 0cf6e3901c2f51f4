"""Clustering with associative memories (ClAM, Saha, Krotov, Zaki, Ram, ICML 2023) and the k-means baselines.

The k prototypes rho_1..rho_k (rows of `protos`, shape (k, d)) are the memories of a dense associative memory
with the energy

    E(v) = -(1/beta) log sum_mu exp(-beta/2 ||rho_mu - v||^2).

A point flows down E with the discretised attractor dynamics

    w_mu(v) = softmax_mu(-beta/2 ||rho_mu - v||^2),    v <- v + alpha m * sum_mu w_mu(v) (rho_mu - v)

(m: the coordinates allowed to move; all of them at inference), T = 1/alpha steps. Its cluster is the prototype
nearest to where it ends, argmin_mu ||rho_mu - v_T||. ClAM trains the prototypes end to end through the unrolled
dynamics with a pattern-completion loss: hide a random fraction of a point's coordinates (fill them with the
feature mean/min/max), let only those coordinates move, and ask the AM to restore them,
L = mean(m * (v_T - x)^2).

Every function broadcasts over leading "config" dimensions: `protos` (C, k, d) with `v` (C, n, d) and `beta` a
float or a (C,) tensor run C independent associative memories (e.g. a beta sweep) in one tensor op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

FILLS = ("mean", "min", "max", "zero")


def _beta(beta, like: torch.Tensor) -> torch.Tensor:
    """beta as a tensor broadcastable against a (..., n, k) distance matrix."""
    b = torch.as_tensor(beta, dtype=like.dtype, device=like.device)
    return b[..., None, None]


def sq_dists(v: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """||rho_mu - v_i||^2 for v (..., n, d) and protos (..., k, d): (..., n, k)."""
    d2 = v.pow(2).sum(-1, keepdim=True) - 2 * v @ protos.transpose(-1, -2) + protos.pow(2).sum(-1).unsqueeze(-2)
    return d2.clamp_min(0)


def am_energy(v: torch.Tensor, protos: torch.Tensor, beta) -> torch.Tensor:
    """E(v) = -(1/beta) logsumexp_mu(-beta/2 ||rho_mu - v||^2), per point: (..., n)."""
    b = _beta(beta, v)
    return -torch.logsumexp(-b / 2 * sq_dists(v, protos), dim=-1) / b[..., 0]


def am_weights(v: torch.Tensor, protos: torch.Tensor, beta) -> torch.Tensor:
    """w_mu(v) = softmax_mu(-beta/2 ||rho_mu - v||^2): (..., n, k), rows sum to 1."""
    return torch.softmax(-_beta(beta, v) / 2 * sq_dists(v, protos), dim=-1)


def am_step(v: torch.Tensor, protos: torch.Tensor, beta, alpha: float = 0.1,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """One step of the AM dynamics: v + alpha m (sum_mu w_mu(v) rho_mu - v)  (= v - alpha m grad E(v)).

    For 0 < alpha <= 1 (any 0/1 mask) the energy does not increase: E = ||v||^2/2 - g(v) with g convex
    (a log-sum-exp of affine functions), so the step minimises a quadratic upper bound of E."""
    upd = am_weights(v, protos, beta) @ protos - v
    return v + alpha * (upd if mask is None else mask * upd)


def am_descend(v: torch.Tensor, protos: torch.Tensor, beta, alpha: float = 0.1, steps: int | None = None,
               mask: torch.Tensor | None = None, return_path: bool = False):
    """T = `steps` (default round(1/alpha)) AM steps from v; differentiable. With `return_path` also the
    (T+1, ..., n, d) trajectory."""
    steps = round(1 / alpha) if steps is None else steps
    path = [v]
    for _ in range(steps):
        v = am_step(v, protos, beta, alpha, mask)
        path.append(v)
    return (v, torch.stack(path)) if return_path else v


def nearest(x: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """Hard assignment argmin_mu ||rho_mu - x||: (..., n) long."""
    return sq_dists(x, protos).argmin(-1)


@torch.no_grad()
def assign(x: torch.Tensor, protos: torch.Tensor, beta, alpha: float = 0.1, steps: int | None = None,
           batch: int = 4096) -> torch.Tensor:
    """ClAM's cluster labels: run the unmasked dynamics from x for T steps, then the nearest prototype of v_T.
    x (n, d) or (C, n, d); protos (k, d) or (C, k, d). Returns (n,) or (C, n)."""
    if x.dim() < protos.dim():
        x = x.expand(*protos.shape[:-2], *x.shape)
    out = [nearest(am_descend(x[..., i:i + batch, :], protos, beta, alpha, steps), protos)
           for i in range(0, x.shape[-2], batch)]
    return torch.cat(out, -1)


# ----------------------------------------------------------------------------- masking

def fill_values(x: torch.Tensor, kind: str = "mean") -> torch.Tensor:
    """The per-feature value a hidden coordinate is overwritten with: the data's mean, min, max or 0: (d,)."""
    if kind not in FILLS:
        raise ValueError(f"unknown fill {kind!r}; valid: {FILLS}")
    if kind == "zero":
        return torch.zeros(x.shape[-1], dtype=x.dtype)
    return {"mean": x.mean(0), "min": x.min(0).values, "max": x.max(0).values}[kind]


def random_mask(n: int, d: int, p: float, generator: torch.Generator | None = None,
                shared: bool = False) -> torch.Tensor:
    """(n, d) 0/1 float mask with exactly max(1, round(p d)) ones per row, drawn without replacement; with
    `shared` every row hides the same coordinates (the repo's "entire dimension" batches)."""
    m = max(1, round(p * d))
    rows = 1 if shared else n
    idx = torch.rand(rows, d, generator=generator).argsort(-1)[:, :m]
    mask = torch.zeros(rows, d).scatter_(1, idx, 1.0)
    return mask.expand(n, d).clone() if shared else mask


def mask_input(x: torch.Tensor, mask: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """x with the masked coordinates overwritten by `fill`: (1 - m) x + m fill."""
    return x * (1 - mask) + mask * fill


def completion_loss(v_t: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pattern-completion loss mean(m * (v_T - x)^2) over points and coordinates, per config: (...,)."""
    return (mask * (v_t - x).pow(2)).mean((-1, -2))


# ----------------------------------------------------------------------------- ClAM training

@dataclass
class ClamFit:
    """Result of `clam_fit`: prototypes (C, k, d) of the best epoch of each config (lowest training loss, as
    the repo keeps), the per-epoch loss (epochs, C), the betas (C,) and final learning rates (C,)."""
    protos: torch.Tensor
    loss: torch.Tensor
    beta: torch.Tensor
    lr: torch.Tensor
    alpha: float


def init_prototypes(c: int, k: int, d: int, seed: int = 0, mean: float = 0.1, std: float = 0.1) -> torch.Tensor:
    """The repo's initialisation: every prototype coordinate ~ N(mean, std): (c, k, d)."""
    g = torch.Generator().manual_seed(seed)
    return mean + std * torch.randn(c, k, d, generator=g)


def clam_fit(x: torch.Tensor, k: int, beta: float | Sequence[float], *, alpha: float = 0.1, epochs: int = 60,
             batch: int = 64, lr: float = 0.05, mask_prob: float = 0.2, fill: str | Sequence[str] = "mean",
             shared_every: int = 3,
             masked: bool = True, init: torch.Tensor | None = None, seed: int = 0, patience: int = 5,
             reduce: float = 0.8, window: int = 10, tol: float = 1e-3, progress=None) -> ClamFit:
    """Train C = len(beta) ClAMs at once (one per beta; `fill` one name or one per config) on data x (n, d).

    Per batch: draw a mask m (every `shared_every`-th epoch one mask for the whole batch), x0 = mask_input(x, m,
    fill), v_T = am_descend(x0, R, beta, alpha, mask=m), loss = completion_loss(v_T, x, m); Adam on R only.
    `masked=False` is the no-self-supervision ablation: x0 = x, every coordinate moves, loss = mean (v_T - x)^2.
    Learning rate per config x `reduce` when the `window`-epoch running mean of its loss improves by less than
    `tol` (relative) `patience` epochs in a row (the repo's plateau rule). Adam is written out so that every
    config has its own learning rate; the configs never interact."""
    betas = torch.as_tensor(beta, dtype=x.dtype).reshape(-1)
    c, (n, d) = len(betas), x.shape
    dev = x.device
    betas = betas.to(dev)
    r = (init_prototypes(c, k, d, seed) if init is None else init.clone()).to(dev, x.dtype)
    r.requires_grad_(True)
    fill = [fill] * c if isinstance(fill, str) else list(fill)
    if len(fill) != c:
        raise ValueError(f"{len(fill)} fills for {c} configs")
    fills = torch.stack([fill_values(x, f) for f in fill])[:, None, :]  # (C, 1, d)
    g = torch.Generator().manual_seed(seed + 1)
    lrs = torch.full((c,), float(lr), device=dev)
    m1, m2 = torch.zeros_like(r), torch.zeros_like(r)
    b1, b2, eps, t = 0.9, 0.999, 1e-7, 0
    hist, best, best_loss = [], r.detach().clone(), torch.full((c,), math.inf, device=dev)
    bad, prev = torch.zeros(c, dtype=torch.long, device=dev), torch.full((c,), math.inf, device=dev)
    epochs_iter = range(1, epochs + 1) if progress is None else progress(range(1, epochs + 1))
    for epoch in epochs_iter:
        perm = torch.randperm(n, generator=g).to(dev)
        tot = torch.zeros(c, device=dev)
        for i in range(0, n, batch):
            xb = x[perm[i:i + batch]]
            if masked:
                mk = random_mask(len(xb), d, mask_prob, g, shared=epoch % shared_every == 0).to(dev, x.dtype)
                x0 = mask_input(xb, mk, fills)
            else:
                mk, x0 = torch.ones_like(xb), xb.expand(c, *xb.shape)
            v = am_descend(x0, r, betas, alpha, mask=mk)
            loss = completion_loss(v, xb, mk)
            (grad,) = torch.autograd.grad(loss.sum(), r)
            with torch.no_grad():  # Adam (Kingma & Ba) with one learning rate per config
                t += 1
                m1.mul_(b1).add_(grad, alpha=1 - b1)
                m2.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                step = (m1 / (1 - b1 ** t)) / ((m2 / (1 - b2 ** t)).sqrt() + eps)
                r -= lrs[:, None, None] * step
            tot += loss.detach() * len(xb) / n
        hist.append(tot)
        better = tot < best_loss
        best[better] = r.detach()[better]
        best_loss = torch.where(better, tot, best_loss)
        if epoch >= window:
            run_mean = torch.stack(hist[-window:]).mean(0)
            stall = (prev - run_mean) < tol * run_mean
            bad = torch.where(stall, bad + 1, torch.zeros_like(bad))
            hit = bad >= patience
            lrs = torch.where(hit, lrs * reduce, lrs)
            bad[hit] = 0
            prev = run_mean
    return ClamFit(best, torch.stack(hist).cpu(), betas, lrs, alpha)


# ----------------------------------------------------------------------------- k-means and metrics

def lloyd_step(x: torch.Tensor, centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One Lloyd iteration: labels = nearest center, then each center = mean of its points (an empty cluster
    keeps its center). Returns (new centers (k, d), labels (n,))."""
    labels = nearest(x, centers)
    k = len(centers)
    counts = torch.bincount(labels, minlength=k).to(x.dtype)
    sums = torch.zeros_like(centers).index_add_(0, labels, x)
    new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centers)
    return new, labels


def soft_kmeans_step(x: torch.Tensor, centers: torch.Tensor, beta: float) -> torch.Tensor:
    """One soft k-means (EM with a shared isotropic variance 1/beta) update: centers = weighted means with the
    AM weights w_mu(x); beta -> infinity gives `lloyd_step`."""
    w = am_weights(x, centers, beta)
    return (w.T @ x) / w.sum(0).clamp_min(1e-12)[:, None]


def kmeans(x: torch.Tensor, k: int, n_init: int = 1, seed: int = 0, init: str = "random") -> np.ndarray:
    """Lloyd's k-means from sklearn (algorithm "lloyd"); `n_init` restarts kept by inertia. Returns labels."""
    from sklearn.cluster import KMeans

    km = KMeans(k, init=init, n_init=n_init, random_state=seed, algorithm="lloyd", max_iter=300)
    return km.fit_predict(np.asarray(x, dtype=np.float64))


def silhouette(x, labels) -> float:
    """Euclidean Silhouette coefficient (sklearn); -1 when everything falls in one cluster (as the repo)."""
    from sklearn.metrics import silhouette_score

    labels = np.asarray(labels)
    return -1.0 if len(np.unique(labels)) < 2 else float(silhouette_score(np.asarray(x), labels))


def ari(y_true, labels) -> float:
    """Adjusted Rand index against the true classes (sklearn)."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(np.asarray(y_true), np.asarray(labels)))
