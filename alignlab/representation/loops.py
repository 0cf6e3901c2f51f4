"""Supervised fitting, evaluation and linear probes for the representation family (on `alignlab.train.fit`)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .. import train


def fit_supervised(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, *, lr: float = 3e-3,
                   batch_size: int = 128, groups: list[dict] | None = None, weight_decay: float = 1e-4,
                   loss_fn: Callable | None = None, augment: Callable | None = None, seed: int = 0,
                   desc: str = "fit", progress: bool = True) -> list[float]:
    """Minibatch training of `model` on (x, y), in place (AdamW, one-cycle learning rate).

    `loss_fn(model, xb, yb)` defaults to cross-entropy of `model(xb)`; `augment(xb, generator)` transforms
    each batch; `groups` gives parameter groups with their own learning rate (see `alignlab.train.fit`)."""
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
    g = torch.Generator().manual_seed(seed)
    loss_fn = loss_fn or (lambda m, xb, yb: F.cross_entropy(m(xb), yb))

    def step_loss(m, step):
        idx = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=g)
        xb = x[idx] if augment is None else augment(x[idx], g)
        return loss_fn(m, xb, y[idx])

    return train.fit(model, step_loss, steps, lr=lr, weight_decay=weight_decay, desc=desc, progress=progress,
                     groups=groups)


@torch.no_grad()
def apply(fn: Callable, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """`fn` over `x` in batches, without gradients (e.g. `apply(model.features, x)`)."""
    return torch.cat([fn(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, n_classes: int | None = None) -> dict:
    """Accuracy, per-class accuracy (NaN for absent classes) and the predictions of `model` in eval mode."""
    was_training = model.training
    model.eval()
    pred = apply(model, x).argmax(1)
    model.train(was_training)
    n_classes = n_classes or int(max(y.max(), pred.max())) + 1
    hit = (pred == y).float()
    per_class = torch.full((n_classes,), float("nan"))
    for c in torch.unique(y).tolist():
        per_class[c] = hit[y == c].mean()
    return {"acc": hit.mean().item(), "per_class": per_class, "pred": pred}


def linear_probe(feats: torch.Tensor, y: torch.Tensor, n_classes: int | None = None, steps: int = 300,
                 lr: float = 1e-2, seed: int = 0) -> torch.nn.Linear:
    """A linear classifier fitted on frozen features (full-batch cross-entropy, AdamW)."""
    n_classes = n_classes or int(y.max()) + 1
    torch.manual_seed(seed)
    probe = torch.nn.Linear(feats.shape[1], n_classes)
    train.fit(probe, lambda m, step: F.cross_entropy(m(feats), y), steps, lr=lr, weight_decay=1e-4,
              desc="linear probe", progress=False)
    return probe
