"""Online test-time adaptation (TTA) of a BatchNorm network over a stream of unlabelled test batches.

A method sees each batch once, predicts it, and (for the gradient methods) takes one optimiser step on the
BatchNorm affine parameters (gamma, beta) only; everything else stays frozen. Methods:

* ``source``: the unadapted model in eval mode (BN running statistics of the source data);
* ``bn``: BN adaptation, normalising with the test batch's own statistics, no gradient step;
* ``tent``: BN adaptation + minimising the Shannon entropy of the predictions (Wang et al. 2021);
* ``pl``: BN adaptation + hard pseudo-label cross-entropy on the model's own argmax;
* ``global``: BN adaptation + class-agnostic feature alignment, matching the batch mean and covariance of
  the features to the source ones (the "global feature alignment" that CAFA's Figure 1 contrasts with);
* ``cafa``: BN adaptation + the class-aware feature alignment loss of CAFA (Jung et al., ICCV 2023).

Source statistics (class Gaussians of the penultimate features) come from `features.class_gaussians` on a small
labelled source subset, in float64; the Mahalanobis distances from `features.mahalanobis`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from . import features

METHODS = ("source", "bn", "tent", "pl", "global", "cafa")
GRADIENT_METHODS = ("tent", "pl", "global", "cafa")
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def bn_layers(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm modules of `model`, in order."""
    return [m for m in model.modules() if isinstance(m, _BN)]


def bn_affine_params(model: nn.Module) -> list[nn.Parameter]:
    """The affine parameters (gamma = weight, beta = bias) of every BatchNorm layer: what TENT and CAFA adapt."""
    return [p for m in bn_layers(model) for p in (m.weight, m.bias) if p is not None]


def configure(model: nn.Module, method: str) -> nn.Module:
    """A copy of `model` set up for `method`: ``source`` in eval mode; every other method normalises with the
    statistics of the current test batch (BN in train mode, running statistics dropped so nothing drifts) and
    only the BN affine parameters require gradients."""
    if method not in METHODS:
        raise ValueError(f"unknown TTA method {method!r}; valid: {METHODS}")
    m = copy.deepcopy(model)
    m.requires_grad_(False)
    if method == "source":
        return m.eval()
    if not bn_layers(m):
        raise ValueError("test-time BN adaptation needs a model with BatchNorm layers")
    m.train()
    for bn in bn_layers(m):
        bn.track_running_stats = False
        bn.running_mean, bn.running_var = None, None
    for p in bn_affine_params(m):
        p.requires_grad_(method in GRADIENT_METHODS)
    return m


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """TENT: the mean Shannon entropy of the predictions, H = -(1/N) sum_i sum_c p_ic log p_ic."""
    logp = logits.log_softmax(1)
    return -(logp.exp() * logp).sum(1).mean()


def pseudo_label_loss(logits: torch.Tensor) -> torch.Tensor:
    """Hard pseudo-labels: cross-entropy of the logits with their own (detached) argmax."""
    return F.cross_entropy(logits, logits.detach().argmax(1))


def source_statistics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n_classes: int | None = None,
                      shared: bool = True, shrink: float = 0.1) -> dict:
    """CAFA's pre-stage: class Gaussians of the source model's penultimate features `model.features(x)` on a
    small labelled source subset (eval mode, float64): mean (C, d), cov (d, d) shared or (C, d, d) per class,
    and the class-agnostic ``global_mean`` (d,) / ``global_cov`` (d, d) used by the ``global`` baseline."""
    was = model.training
    model.eval()
    with torch.no_grad():
        z = model.features(x).double()
    model.train(was)
    stats = features.class_gaussians(z, y, n_classes, shared=shared, shrink=shrink)
    stats["global_mean"] = z.mean(0)
    stats["global_cov"] = torch.cov(z.T)
    return stats


def cafa_loss(z: torch.Tensor, pred: torch.Tensor, stats: dict, eps: float = 1e-8) -> torch.Tensor:
    """The class-aware feature alignment loss on a batch of features z (N, d) with predicted classes `pred`:

        L = (1/N) sum_i log[ D(z_i; mu_{y_i}, Sigma_{y_i}) / sum_c D(z_i; mu_c, Sigma_c) ],
        D(z; mu, Sigma) = (z - mu)^T Sigma^{-1} (z - mu)   (squared Mahalanobis distance),

    y_i = the model's detached prediction. Lowering it shrinks the distance to the predicted class (intra) and
    grows the distances to the other classes (inter) at once; it is <= 0, and -> -inf as z_i -> mu_{y_i}.
    No hyperparameter besides `eps` (guards the log). Computed in float64 (`stats` from `source_statistics`)."""
    d = features.mahalanobis(z.double(), stats["mean"], stats["cov"])  # N, C
    intra = d.gather(1, pred.view(-1, 1)).squeeze(1)
    return (torch.log(intra + eps) - torch.log(d.sum(1) + eps)).mean().to(z.dtype)


def global_alignment_loss(z: torch.Tensor, stats: dict) -> torch.Tensor:
    """Class-agnostic feature alignment: match the batch's feature mean and covariance to the source ones,
    ||m_b - m_s||^2 + ||S_b - S_s||_F^2 / d  (the global alignment of CAFA's Figure 1; no class information)."""
    zd = z.double()
    m = zd.mean(0)
    s = torch.cov(zd.T)
    loss = (m - stats["global_mean"]).pow(2).sum() + (s - stats["global_cov"]).pow(2).sum() / zd.shape[1]
    return loss.to(z.dtype)


def method_loss(method: str, logits: torch.Tensor, z: torch.Tensor, stats: dict | None) -> torch.Tensor:
    """The unsupervised test-time loss of a gradient method on one batch."""
    if method == "tent":
        return entropy_loss(logits)
    if method == "pl":
        return pseudo_label_loss(logits)
    if stats is None:
        raise ValueError(f"method {method!r} needs source statistics (`source_statistics`)")
    if method == "global":
        return global_alignment_loss(z, stats)
    if method == "cafa":
        return cafa_loss(z, logits.detach().argmax(1), stats)
    raise ValueError(f"{method!r} has no test-time loss; gradient methods: {GRADIENT_METHODS}")


def run_online(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, method: str = "cafa", *,
               stats: dict | None = None, batch_size: int = 64, lr: float = 1e-3, shuffle: bool = True,
               seed: int = 0, return_model: bool = False) -> dict:
    """Adapt a copy of `model` online over the stream `x` (one pass, batches of `batch_size`, shuffled with
    `seed`) and predict each batch with the same forward pass that produces the loss (prediction first, then
    one Adam step on the BN affine parameters). `model` must have `.features(x)` and `.head`.

    Returns pred (N,) and feats (N, d) (the features each sample had when it was predicted; empty if the model
    has no `feature_dim`) in the original order of `x`, err (1 - accuracy, if `y` is given), the loss per batch
    and, with `return_model`, the adapted model."""
    net = configure(model, method)
    params = bn_affine_params(net) if method in GRADIENT_METHODS else []
    opt = torch.optim.Adam(params, lr=lr) if params else None
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) if shuffle \
        else torch.arange(len(x))
    starts = list(range(0, len(x), batch_size))
    if len(starts) > 1 and len(x) - starts[-1] < 2:  # BN cannot normalise one sample: merge it into the last batch
        starts.pop()
    ends = starts[1:] + [len(x)]
    pred = torch.empty(len(x), dtype=torch.long)
    feats = torch.empty(len(x), net.feature_dim if hasattr(net, "feature_dim") else 0)
    losses = []
    for a, b in zip(starts, ends):
        idx = order[a:b]
        with torch.set_grad_enabled(opt is not None):
            z = net.features(x[idx])
            logits = net.head(z)
        pred[idx] = logits.detach().argmax(1)
        if feats.shape[1] == z.shape[1]:
            feats[idx] = z.detach()
        if opt is not None:
            loss = method_loss(method, logits, z, stats)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    out = {"pred": pred, "feats": feats, "losses": losses}
    if y is not None:
        out["err"] = (pred != y).float().mean().item()
    if return_model:
        out["model"] = net
    return out


@torch.no_grad()
def distance_summary(z: torch.Tensor, y: torch.Tensor, stats: dict) -> dict:
    """Figure 1's analysis with the true labels: mean intra-class distance D(z_i; mu_{y_i}) and mean
    inter-class distance (average of D(z_i; mu_c) over c != y_i), and their ratio inter / intra."""
    d = features.mahalanobis(z.double(), stats["mean"], stats["cov"])
    intra = d.gather(1, y.view(-1, 1)).squeeze(1)
    inter = (d.sum(1) - intra) / (d.shape[1] - 1)
    return {"intra": intra.mean().item(), "inter": inter.mean().item(),
            "ratio": (inter.mean() / intra.mean()).item()}
