"""One small training loop for every toy model: AdamW, one-cycle learning rate, optional EMA, text progress."""

from __future__ import annotations

import copy
from typing import Callable

import torch

from .runtime import Progress


def fit(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, int], torch.Tensor], steps: int,
        lr: float = 2e-3, weight_decay: float = 0.0, ema: float | None = None, desc: str = "train",
        progress: bool = True, groups: list[dict] | None = None) -> list[float]:
    """Minimise `loss_fn(model, step)` for `steps` steps, in place. With `ema`, the model ends with the
    exponential moving average of its weights (decay `ema`). Returns the loss per step.

    `groups` gives parameter groups with their own peak learning rate, e.g.
    `[{"params": net.body.parameters(), "lr": 1e-4}, {"params": net.head.parameters(), "lr": 1e-2}]`
    (parameters left out are not trained); each group follows the same one-cycle shape."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    model.train()
    groups = [{"params": model.parameters(), "lr": lr}] if groups is None else [dict(g) for g in groups]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                total_steps=steps, pct_start=0.1)
    avg = copy.deepcopy(model).requires_grad_(False) if ema else None
    params, avg_params = list(model.parameters()), list(avg.parameters()) if ema else []
    losses = []
    bar = Progress(range(steps), desc, every=4, enabled=progress)
    for step in bar:
        loss = loss_fn(model, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if avg is not None:
            with torch.no_grad():
                torch._foreach_lerp_(avg_params, params, 1 - ema)
        bar.note(loss=sum(losses[-50:]) / len(losses[-50:]))
    if avg is not None:
        model.load_state_dict(avg.state_dict())
    model.eval()
    return losses
