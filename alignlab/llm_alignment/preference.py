"""A training loop for offline preference losses on the tiny LMs of `lm.py` (paired or unpaired data).

Data are plain dicts of token lists; the reference log-probabilities are computed once up front (the reference
is frozen), so a step costs one policy forward/backward (two for paired data, plus one no-grad pass of each
model for KTO's mismatched reference point).

- paired:   `{"prompts": [[ids]], "chosen": [[ids]], "rejected": [[ids]]}`
- unpaired: `{"prompts": [[ids]], "responses": [[ids]], "desirable": bool array[N],
  "weight": optional float array[N]}` (`weight` is BCO's UDM density-ratio weight, used on undesirable rows)

Either may carry the frozen reference's log-probabilities (`"ref_chosen"`, `"ref_rejected"`; `"ref_logps"`) when
several runs share one reference; otherwise they are computed here.

`preference_train(policy, ref, data, method, ...)` with `method` one of

    "sft"   `lm.sft` (token-mean cross-entropy) on the desirable (or chosen) responses only
    "dpo"   losses.dpo_loss on pairs
    "ipo"   losses.ipo_loss on pairs
    "kto"   losses.kto_loss, z0 = kto_kl_estimate on the batch's mismatched (x_i, y_{i+1}) pairs
    "bco"   losses.bco_loss with the given fixed `delta` (0 by default)
    "bco_shift"  losses.bco_loss with delta = RunningMean of every reward seen (the paper's reward shift)
    "bco_udm"    "bco_shift" plus the UDM weights of `data["weight"]`

returns a history dict (`loss`, `delta`, and the mean implicit reward of desirable / undesirable rows).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import train as train_mod
from . import losses as L
from .lm import batched_logps, make_batch, sequence_logps, sft

METHODS = ("sft", "dpo", "ipo", "kto", "bco", "bco_shift", "bco_udm")
PAIRED = ("dpo", "ipo")


def paired_to_unpaired(data: dict) -> dict:
    """Discard the pairing: every chosen response becomes a thumbs-up, every rejected one a thumbs-down."""
    n = len(data["prompts"])
    return {"prompts": list(data["prompts"]) * 2, "responses": list(data["chosen"]) + list(data["rejected"]),
            "desirable": np.r_[np.ones(n, bool), np.zeros(n, bool)]}


def preference_train(policy, ref, data: dict, method: str, *, steps: int = 100, batch: int = 64,
                     lr: float = 5e-4, beta: float = 0.1, delta: float = 0.0, pad_id: int = 0, seed: int = 0,
                     progress: bool = False) -> dict:
    """Train `policy` in place on `data` with `method` (see the module docstring); `ref` stays frozen."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    g = np.random.default_rng(seed)
    X = list(data["prompts"])
    paired = "chosen" in data
    if paired != (method in PAIRED) and method != "sft":
        raise ValueError(f"{method!r} needs {'paired' if method in PAIRED else 'unpaired'} data")
    hist = {"loss": [], "delta": [], "r_desirable": [], "r_undesirable": []}
    if method == "sft":
        Y = data["chosen"] if paired else [y for y, d in zip(data["responses"], data["desirable"]) if d]
        Xs = X if paired else [x for x, d in zip(X, data["desirable"]) if d]
        policy.requires_grad_(True)
        hist["loss"] = sft(policy, Xs, list(Y), steps, batch, lr, pad_id, seed=seed, progress=progress)
        policy.requires_grad_(False)
        return hist

    def ref_logps(key, responses):
        return torch.as_tensor(data[key]) if key in data else batched_logps(ref, X, responses, pad_id=pad_id)

    if paired:
        Yw, Yl = list(data["chosen"]), list(data["rejected"])
        ref_w, ref_l = ref_logps("ref_chosen", Yw), ref_logps("ref_rejected", Yl)
    else:
        Y, des = list(data["responses"]), np.asarray(data["desirable"], bool)
        w = torch.as_tensor(np.asarray(data.get("weight", np.ones(len(Y))), float), dtype=torch.float32)
        ref_lp = ref_logps("ref_logps", Y)
    running = L.RunningMean()

    def loss_fn(model, step):
        if paired:
            idx = g.integers(0, len(X), batch)
            xs = [X[i] for i in idx]
            lp = sequence_logps(model, make_batch(xs + xs, [Yw[i] for i in idx] + [Yl[i] for i in idx],
                                                  pad_id=pad_id))
            pw, pl = lp[:batch], lp[batch:]
            if method == "dpo":
                loss = L.dpo_loss(pw, pl, ref_w[idx], ref_l[idx], beta)[0]
            else:
                loss = L.ipo_loss(pw, pl, ref_w[idx], ref_l[idx], beta)
            hist["r_desirable"].append(beta * (pw.detach() - ref_w[idx]).mean().item())
            hist["r_undesirable"].append(beta * (pl.detach() - ref_l[idx]).mean().item())
            hist["loss"].append(loss.item())
            return loss
        idx = g.integers(0, len(Y), batch)
        xs, ys = [X[i] for i in idx], [Y[i] for i in idx]
        d = torch.as_tensor(des[idx])
        pi = sequence_logps(model, make_batch(xs, ys, pad_id=pad_id))
        r = beta * (pi.detach() - ref_lp[idx])
        hist["r_desirable"].append(r[d].mean().item() if d.any() else float("nan"))
        hist["r_undesirable"].append(r[~d].mean().item() if (~d).any() else float("nan"))
        if method == "kto":
            ys_mis = ys[1:] + ys[:1]  # (x_i, y_{i+1}): completions that do not answer the prompt
            with torch.no_grad():
                bm = make_batch(xs, ys_mis, pad_id=pad_id)
                z0 = L.kto_kl_estimate(sequence_logps(model, bm), sequence_logps(ref, bm))
            loss = L.kto_loss(pi, ref_lp[idx], d, z0, beta)
            hist["delta"].append(float(z0))
        else:
            dl = running if method in ("bco_shift", "bco_udm") else delta
            uw = w[idx] if method == "bco_udm" else None
            loss, used = L.bco_loss(pi, ref_lp[idx], d, beta, delta=dl, udm_weight=uw)
            hist["delta"].append(used)
        hist["loss"].append(loss.item())
        return loss

    policy.requires_grad_(True)
    train_mod.fit(policy, loss_fn, steps, lr=lr, desc=method, progress=progress)
    policy.requires_grad_(False)
    if method in ("bco_shift", "bco_udm"):
        hist["running_mean"] = running.state_dict()
    return hist


# ---------------------------------------------------------------- data for binary feedback
def pairs_from_samples(world, prompts, ya, yb, *, seed: int = 0, **label_kw) -> dict:
    """A paired data set: Bradley-Terry labels of `world.label_pairs` pick the chosen one of two responses."""
    lab = world.label_pairs(prompts, ya, yb, seed=seed, **label_kw)
    return {"prompts": list(prompts.ids), "chosen": [a if l else b for a, b, l in zip(ya, yb, lab)],
            "rejected": [b if l else a for a, b, l in zip(ya, yb, lab)]}


def skewed_feedback(group: np.ndarray, desirable: np.ndarray, n: int, share: float, *, seed: int = 0):
    """Indices of a binary-feedback set whose thumbs-up and thumbs-down prompts differ in distribution:
    `n` desirable rows, a fraction `share` of them with `group` True, and `n` undesirable rows, a fraction
    `share` of them with `group` False (drawn without replacement). Returns `(idx, desirable[idx])`."""
    g = np.random.default_rng(seed)
    group, desirable = np.asarray(group, bool), np.asarray(desirable, bool)
    k = int(round(share * n))
    pick = []
    for want, main in ((True, group), (False, ~group)):
        pool_main = np.flatnonzero((desirable == want) & main)
        pool_other = np.flatnonzero((desirable == want) & ~main)
        if len(pool_main) < k or len(pool_other) < n - k:
            raise ValueError("not enough samples for this share; sample more responses")
        pick += [g.choice(pool_main, k, replace=False), g.choice(pool_other, n - k, replace=False)]
    idx = np.concatenate(pick)
    return idx, desirable[idx]


@torch.no_grad()
def prompt_embeddings(model, prompts, batch: int = 512, pad_id: int = 0) -> torch.Tensor:
    """A frozen prompt-only embedding: the last hidden state of `model` (a GPT-2 of `lm.py`) mean-pooled over
    prompt tokens, [N, d]. (BCO's UDM used a sentence encoder; the toy's own LM plays that role.)"""
    out = []
    for i in range(0, len(prompts), batch):
        b = make_batch(prompts[i:i + batch], [[] for _ in prompts[i:i + batch]], pad_id=pad_id)
        att = b["attention_mask"]
        h = model.transformer(input_ids=b["input_ids"], attention_mask=att,
                              position_ids=(att.cumsum(-1) - 1).clamp(min=0)).last_hidden_state
        m = att.unsqueeze(-1).to(h.dtype)
        out.append((h * m).sum(1) / m.sum(1))
    return torch.cat(out).cpu()
