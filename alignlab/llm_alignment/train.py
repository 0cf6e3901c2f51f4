"""Epoch-based SFT with a per-sample loss (plain length-normalised CE, or PoFT) on the tiny LMs, with an
evaluation after every epoch. Step-based preference training is `preference.preference_train`."""

from __future__ import annotations

import numpy as np
import torch

from . import lm, losses

__all__ = ["sft_epochs", "SFT_LOSSES"]


# ---------------------------------------------------------------- per-sample SFT losses over epochs (CE / PoFT)
SFT_LOSSES = ("ce", "poft")


def sft_epochs(model, prompts, responses, *, epochs: int, loss: str = "ce", aligned=None, lr: float = 1e-3,
               batch: int = 64, seed: int = 0, pad_id: int = 0, evaluate=None, schedule: str = "constant",
               progress: bool = True) -> list[dict]:
    """Fine-tune `model` in place for `epochs` shuffled passes with AdamW at `lr` (`schedule` "constant", or
    "cosine": 10% linear warm-up then cosine decay to 0, as in the alignment-handbook SFT recipes), with a
    per-sample loss:

        "ce":   L = - mean_i r_theta(x_i, y_i),   r_theta = (1/|y|) log pi_theta(y | x)  (length-normalised CE)
        "poft": L = - mean_i log sigmoid(r_theta(x_i, y_i) - rbar_i)     (`losses.poft_loss`)

    `aligned`: [N] or [N, M] length-normalised log-likelihoods of the aligned models (constants; PoFT needs
    them). Returns one dict per epoch 0..epochs (0 = before training): `evaluate(model)`'s entries, the epoch's
    mean loss, and `tau` ([N]: each sample's PoFT weight sigmoid(rbar - r_theta) when it was last visited; NaN
    at epoch 0 or without `aligned`)."""
    if loss not in SFT_LOSSES:
        raise ValueError(f"loss must be one of {SFT_LOSSES}, got {loss!r}")
    if loss == "poft" and aligned is None:
        raise ValueError("PoFT needs the aligned models' scores (`aligned`)")
    from ..runtime import Progress

    n = len(responses)
    ra = None if aligned is None else torch.as_tensor(aligned, dtype=torch.float32)
    g = np.random.default_rng(seed)
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    total, warm = epochs * -(-n // batch), max(1, epochs * -(-n // batch) // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 if schedule == "constant" else (
        (k + 1) / warm if k < warm else 0.5 * (1 + np.cos(np.pi * (k - warm) / max(1, total - warm)))))
    hist = [{"epoch": 0, "loss": float("nan"), "tau": np.full(n, np.nan), **(evaluate(model) if evaluate else {})}]
    for ep in Progress(range(1, epochs + 1), f"{loss} epochs", every=epochs, enabled=progress):
        model.train()
        tau, tot = np.full(n, np.nan), []
        order = g.permutation(n)
        for s in range(0, n, batch):
            idx = order[s:s + batch]
            b = lm.make_batch([prompts[i] for i in idx], [responses[i] for i in idx], pad_id=pad_id)
            r = lm.sequence_logps(model, b, average=True)
            if ra is not None:
                tau[idx] = losses.poft_weights(r.detach().cpu(), ra[idx]).numpy()
            lo = -r.mean() if loss == "ce" else losses.poft_loss(r, ra[idx].to(r.device))
            opt.zero_grad(set_to_none=True)
            lo.backward()
            opt.step()
            sched.step()
            tot.append(lo.item())
        model.eval()
        hist.append({"epoch": ep, "loss": float(np.mean(tot)), "tau": tau, **(evaluate(model) if evaluate else {})})
    return hist
