"""Class-incremental learning on a pre-trained backbone (SLCA, arXiv 2303.05118, and its baselines).

- `pretrained_backbone`: a cached MLP trained on some digit classes of a held-out "pre-training" half of
  sklearn digits (the toy stand-in for an ImageNet-pre-trained ViT).
- `digits_stream`: the three disjoint digit splits (pre-train / continual train / continual test).
- `run_sequence`: sequential fine-tuning over class-incremental tasks with a backbone learning rate
  `lr_scale * head_lr` (the Slow Learner when lr_scale << 1), optionally followed after every task by
  `classifier_alignment` (CA) from frozen class Gaussians. Returns the T x T accuracy matrices with and
  without CA.
- `cl_metrics`: last accuracy, average incremental accuracy and forgetting of an accuracy matrix.

Labels inside this module are *positions in the class order* (task t owns positions [sum of earlier sizes,
+ size of t)), so a head row is a class and the tasks are contiguous blocks of rows.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import cache
from .. import data as adata
from . import features, loops, nets


# -- data and the pre-trained backbone ------------------------------------------------------------

def digits_stream(pretrain_fraction: float = 0.5, test_fraction: float = 0.4, seed: int = 0) -> dict:
    """sklearn digits (N, 1, 8, 8) in [-1, 1] cut into three stratified, disjoint parts: `pretrain`
    (pretrain_fraction of the images), and the rest split into `train` / `test` (test_fraction of the rest).
    The pre-training cut is fixed (seed 0) so the cached backbone never saw a continual image; `seed` only
    reshuffles the continual train/test split. Returns {part: (x, y)}."""
    from sklearn.model_selection import train_test_split

    x, y = adata.digits("all")
    idx = np.arange(len(y))
    pre, rest = train_test_split(idx, train_size=pretrain_fraction, stratify=y.numpy(), random_state=0)
    tr, te = train_test_split(rest, test_size=test_fraction, stratify=y.numpy()[rest], random_state=seed)
    return {k: (x[torch.as_tensor(v)], y[torch.as_tensor(v)]) for k, v in (("pretrain", pre), ("train", tr),
                                                                            ("test", te))}


def _pretrain(net: nn.Module, classes: Sequence[int], steps: int, lr: float) -> None:
    x, y = digits_stream()["pretrain"]
    keep = torch.isin(y, torch.tensor(list(classes)))
    x, y = x[keep], y[keep]
    remap = torch.full((10,), -1, dtype=torch.long)
    remap[torch.tensor(list(classes))] = torch.arange(len(classes))

    def augment(xb, g):  # small random shifts and pixel noise: a more general "pre-training"
        out = xb + 0.1 * torch.randn(xb.shape, generator=g)
        dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
        return torch.roll(out, shifts=(dx, dy), dims=(2, 3))

    loops.fit_supervised(net, x, remap[y], steps, lr=lr, batch_size=64, augment=augment,
                         desc="pre-train backbone")


def _backbone(widths: Sequence[int], n_classes: int, layer_norm: bool) -> nets.MLP:
    net = nets.MLP(64, widths, n_classes)
    if layer_norm:  # a ViT-like pre-logit LayerNorm: centred, unit-scale features
        net.body.append(nn.LayerNorm(net.feature_dim))
    return net


def pretrained_backbone(classes: Sequence[int] = (0, 1, 2, 3, 4), widths: Sequence[int] = (256, 128),
                        steps: int = 600, lr: float = 3e-3, layer_norm: bool = True,
                        seed: int = 0) -> nets.MLP:
    """An `nets.MLP(64, widths, len(classes))` trained with cross-entropy on the pre-training part of
    `digits_stream` restricted to `classes` (random one-pixel shifts and light noise as augmentation), cached
    on disk. It knows strokes, not the classes it never saw."""
    classes = list(classes)
    config = {"classes": classes, "widths": list(widths), "steps": steps, "lr": lr, "layer_norm": layer_norm,
              "seed": seed}
    return cache.cached_module("slca_backbone", config, lambda: _backbone(widths, len(classes), layer_norm),
                               lambda net: _pretrain(net, classes, steps, lr),
                               code=(_pretrain, _backbone, digits_stream),
                               seed=seed)


# -- the learner ----------------------------------------------------------------------------------

class IncrementalNet(nn.Module):
    """A backbone (`features(x)`) and an `ExpandingHead` that gains the rows of each new task."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = copy.deepcopy(backbone)
        self.head = nets.ExpandingHead(backbone.feature_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def task_logit_norm(logits: torch.Tensor, task_sizes: Sequence[int], tau: float = 0.1) -> torch.Tensor:
    """SLCA's logit normalisation for CA: logits / (mean over tasks t of ||logits[:, block t]||_2) / tau.
    One scalar per sample (the mean per-task norm), so the argmax is unchanged; only the loss sees it."""
    norms = torch.stack([b.norm(dim=1) + 1e-7 for b in logits.split(list(task_sizes), dim=1)], 1)
    return logits / norms.mean(1, keepdim=True) / tau


def classifier_alignment(head: nets.ExpandingHead, stats: dict, task_of_class: torch.Tensor,
                         current_task: int, task_sizes: Sequence[int], *, epochs: int = 5,
                         n_per_class: int = 256, lr: float = 0.01,
                         momentum: float = 0.9, weight_decay: float = 5e-4, tau: float | None = 0.1,
                         mean_decay: bool = True, seed: int = 0) -> list[float]:
    """Post-hoc Classifier Alignment (CA), in place on `head` (the backbone is not involved).

    Every epoch draws `n_per_class` features per seen class c from N(s_c mu_c, Sigma_c), with the repo's
    shrink of older classes s_c = 0.9 + 0.1 (t_c + 1)/(t + 1) (s_c = 1 without `mean_decay`), shuffles them
    and takes one pass in batches of `n_per_class` (SGD with momentum, cosine learning rate over the epochs)
    on the cross-entropy of `task_logit_norm(head(z), task_sizes, tau)` (plain logits when tau is None).
    `stats` holds the class Gaussians (`mean` (C, d), `cov` (C, d, d)) frozen at the end of each class's
    task."""
    n_seen = head.n_classes
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    scale = 0.9 + 0.1 * (task_of_class[:n_seen].double() + 1) / (current_task + 1) if mean_decay \
        else torch.ones(n_seen, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for epoch in range(epochs):
        shrunk = {"mean": stats["mean"][:n_seen] * scale.unsqueeze(1).to(stats["mean"]),
                  "cov": stats["cov"][:n_seen]}
        z, y = features.sample_gaussians(shrunk, n_per_class, seed=seed * 1000 + epoch)
        perm = torch.randperm(len(y), generator=g)
        z, y = z[perm].float(), y[perm]
        for i in range(0, len(y), n_per_class):
            logits = head(z[i:i + n_per_class])
            if tau is not None:
                logits = task_logit_norm(logits, task_sizes, tau)
            loss = F.cross_entropy(logits, y[i:i + n_per_class])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        sched.step()
    return losses


# -- metrics --------------------------------------------------------------------------------------

@torch.no_grad()
def task_accuracies(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    task_sizes: Sequence[int]) -> list[float]:
    """Class-incremental accuracy (argmax over every row the head has, no task id) on the test samples of each
    task whose classes the head knows; `y` are class positions."""
    model.eval()
    pred = loops.apply(model, x).argmax(1)
    out, lo = [], 0
    for size in task_sizes:
        if lo + size > model.head.n_classes:
            break
        m = (y >= lo) & (y < lo + size)
        out.append((pred[m] == y[m]).float().mean().item())
        lo += size
    return out


def cl_metrics(acc: np.ndarray, counts: Sequence[int] | None = None) -> dict:
    """From the accuracy matrix A[t, j] (accuracy on task j after training task t; NaN above the diagonal):
    `last` = accuracy on all test samples after the last task (the paper's Last-Acc; tasks weighted by their
    test `counts`, equal weights by default), `avg_inc` = the mean over t of the accuracy on the tasks seen
    after t (Inc-Acc), `forgetting` = mean over j < T-1 of max_{t<T-1} A[t, j] - A[T-1, j]."""
    acc = np.asarray(acc, dtype=float)
    n = acc.shape[0]
    w = np.ones(n) if counts is None else np.asarray(counts, dtype=float)
    seen = [np.average(acc[t, :t + 1], weights=w[:t + 1]) for t in range(n)]
    forget = [np.nanmax(acc[:n - 1, j]) - acc[n - 1, j] for j in range(n - 1)]
    return {"last": float(seen[-1]), "avg_inc": float(np.mean(seen)),
            "forgetting": float(np.mean(forget)) if forget else 0.0}


# -- the sequence runner --------------------------------------------------------------------------

def relabel(y: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
    """Class ids -> positions in `order` (the head row of each sample's class)."""
    inv = torch.full((int(max(order)) + 1,), -1, dtype=torch.long)
    inv[torch.tensor(list(order))] = torch.arange(len(order))
    return inv[y]


def run_sequence(backbone: nn.Module, train: tuple, test: tuple, order: Sequence[int],
                 classes_per_task: int | Sequence[int], *, lr_scale: float = 0.01, head_lr: float = 0.01,
                 epochs: int = 20, batch_size: int = 32, weight_decay: float = 5e-4, ca: bool = True,
                 ca_epochs: int = 5, ca_samples: int = 256, ca_lr: float = 0.01, tau: float | None = 0.1,
                 shrink: float = 0.1, mean_decay: bool = True, head_init: float | None = 0.02,
                 seed: int = 0) -> dict:
    """Sequential fine-tuning of a copy of `backbone` over class-incremental tasks, no exemplars.

    Task t trains the backbone (learning rate `lr_scale * head_lr`; frozen when lr_scale = 0) and the new head
    rows (`head_lr`) with cross-entropy on the current task's logits only (older rows get no gradient), for
    `epochs` passes in minibatches of `batch_size` (`loops.fit_supervised`: AdamW, one-cycle schedule).
    Then the class Gaussians of the task's classes are computed with the current backbone
    (`features.class_gaussians`, shrinkage `shrink`) and frozen, and, from the second task on, a copy of the
    head is aligned with `classifier_alignment`. As in the official code the aligned head is only used to
    evaluate; the next task continues from the un-aligned head.

    Returns `acc` (T, T) without CA, `acc_ca` (T, T) with CA (NaN above the diagonal; after task 0 they are
    equal), `counts` (test samples per task), `tasks` (class ids per task) and the final `model` (CA head)."""
    x_tr, y_tr = train
    x_te, y_te = test
    p_tr, p_te = relabel(y_tr, order), relabel(y_te, order)
    tasks = _tasks(p_tr, classes_per_task)
    sizes = [len(c) for c, _ in tasks]
    n_tasks = len(tasks)
    task_of_class = torch.repeat_interleave(torch.arange(n_tasks), torch.tensor(sizes))
    model = IncrementalNet(backbone)
    d = model.head.dim
    stats = {"mean": torch.zeros(0, d, dtype=torch.float64), "cov": torch.zeros(0, d, d, dtype=torch.float64)}
    acc = np.full((n_tasks, n_tasks), np.nan)
    acc_ca = acc.copy()
    starts = np.cumsum([0] + sizes[:-1])
    counts = [int(((p_te >= lo) & (p_te < lo + s)).sum()) for lo, s in zip(starts, sizes)]
    lo = 0
    for t, (cls, idx) in enumerate(tasks):
        size = len(cls)
        model.head.add_classes(size)
        _init_rows(model.head, lo, head_init)
        xb, yb = x_tr[idx], p_tr[idx]
        steps = max(1, math.ceil(epochs * len(idx) / batch_size))
        groups = [{"params": list(model.head.parameters()), "lr": head_lr, "weight_decay": 0.0}]
        if lr_scale > 0:
            groups.append({"params": list(model.backbone.parameters()), "lr": lr_scale * head_lr,
                           "weight_decay": weight_decay})
        model.backbone.requires_grad_(lr_scale > 0)

        def current_ce(m, xs, ys, lo=lo, size=size):
            z = m.features(xs)
            logits = z @ m.head.weight[lo:lo + size].T + m.head.bias[lo:lo + size]
            return F.cross_entropy(logits, ys - lo)

        loops.fit_supervised(model, xb, yb, steps, lr=head_lr, batch_size=batch_size, groups=groups,
                             loss_fn=current_ce, seed=seed * 100 + t, desc=f"task {t}", progress=False)
        model.eval()
        feats = loops.apply(model.features, xb).double()
        g = features.class_gaussians(feats, yb - lo, n_classes=size, shrink=shrink)
        stats = {"mean": torch.cat([stats["mean"], g["mean"]]), "cov": torch.cat([stats["cov"], g["cov"]])}
        acc[t, :t + 1] = task_accuracies(model, x_te, p_te, sizes)
        if ca and t > 0:
            aligned = copy.deepcopy(model)
            classifier_alignment(aligned.head, stats, task_of_class, t, sizes[:t + 1], epochs=ca_epochs,
                                 n_per_class=ca_samples, lr=ca_lr, tau=tau, mean_decay=mean_decay,
                                 seed=seed * 100 + t)
            acc_ca[t, :t + 1] = task_accuracies(aligned, x_te, p_te, sizes)
        else:
            aligned = model
            acc_ca[t, :t + 1] = acc[t, :t + 1]
        lo += size
    return {"acc": acc, "acc_ca": acc_ca, "counts": counts,
            "tasks": [[int(order[i]) for i in c] for c, _ in tasks], "model": aligned}


def _init_rows(head: nets.ExpandingHead, start: int, std: float | None) -> None:
    """The official code's head init for new rows: weights ~ truncated N(0, std^2) (at +-2 std), bias 0;
    std None keeps `nn.Linear`'s default."""
    if std is None:
        return
    with torch.no_grad():
        nn.init.trunc_normal_(head.weight[start:], std=std, a=-2 * std, b=2 * std)
        head.bias[start:].zero_()


def _tasks(p: torch.Tensor, classes_per_task) -> list:
    from .data import class_incremental

    n = int(p.max()) + 1
    return class_incremental(p, classes_per_task, order=list(range(n)))


def joint_training(backbone: nn.Module, train: tuple, test: tuple, *, lr_scale: float = 1.0,
                   head_lr: float = 0.01, epochs: int = 20, batch_size: int = 32, weight_decay: float = 5e-4,
                   seed: int = 0) -> float:
    """Upper bound: fine-tune a copy of `backbone` with a fresh head on all classes at once (same recipe and
    epochs as one task of `run_sequence`); returns the test accuracy."""
    (x_tr, y_tr), (x_te, y_te) = train, test
    n = int(y_tr.max()) + 1
    model = IncrementalNet(backbone)
    model.head.add_classes(n)
    groups = [{"params": list(model.head.parameters()), "lr": head_lr, "weight_decay": 0.0}]
    if lr_scale > 0:
        groups.append({"params": list(model.backbone.parameters()), "lr": lr_scale * head_lr,
                       "weight_decay": weight_decay})
    model.backbone.requires_grad_(lr_scale > 0)
    steps = max(1, math.ceil(epochs * len(y_tr) / batch_size))
    loops.fit_supervised(model, x_tr, y_tr, steps, lr=head_lr, batch_size=batch_size, groups=groups,
                         seed=seed, desc="joint", progress=False)
    return loops.evaluate(model, x_te, y_te, n)["acc"]
