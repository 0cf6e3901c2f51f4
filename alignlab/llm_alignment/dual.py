r"""One-shot safety alignment by optimal dualization (Huang et al., NeurIPS 2024, arXiv 2405.19544).

The constrained, KL-regularised alignment problem (one safety utility $g$, e.g. $g = -\text{cost}$)

$$\max_\pi\ \mathbb E_x\mathbb E_{y\sim\pi}[r(x,y)] - \beta\,\mathrm{KL}(\pi\,\|\,\pi_{ref})
\quad\text{s.t.}\quad \mathbb E_x\mathbb E_{y\sim\pi}[g(x,y)] \ge t$$

has, for a multiplier $\lambda \ge 0$, the Lagrangian maximiser
$\pi_\lambda(y\mid x) \propto \pi_{ref}(y\mid x)\exp\bigl((r + \lambda g)/\beta\bigr)$ and the convex, smooth dual

$$D(\lambda) = \beta\,\mathbb E_x \log \mathbb E_{y\sim\pi_{ref}}
\exp\Bigl(\frac{r(x,y) + \lambda (g(x,y) - t)}{\beta}\Bigr),\qquad
D'(\lambda) = \mathbb E_x\mathbb E_{y\sim\pi_\lambda}[g] - t .$$

Stage 1 estimates $D$ from $K$ reference samples per prompt (matrices `R`, `G` of shape [N, K]: the inner
expectation becomes a log-mean-exp, the tilted policy a softmax over the K samples) and solves
$\lambda^\star = \arg\min_{\lambda\ge0} D(\lambda)$ once. Stage 2 trains one unconstrained model towards
$\pi_{\lambda^\star}$: MoCAN relabels preference pairs with $z\sim\mathrm{Bernoulli}(\sigma(s_1 - s_0))$,
$s = r + \lambda^\star g$, and runs plain DPO with the same $\beta$ (`pseudo_labels`); PeCAN does the same with
implicit DPO scores (`pecan_threshold`). The constraint is usually a *margin* over the reference model,
$t = \mathbb E_{\pi_{ref}}[g] + b$ (`margin_threshold`).

Pure numpy; `scipy.optimize` for the scalar solver.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["margin_threshold", "dual_value", "dual_grad", "tilted_weights", "weighted_stats", "tilted_stats",
           "solve_dual", "dual_pgd", "DualSolution", "pseudo_labels", "primal_dual_step", "pecan_threshold"]


def _as2d(a) -> np.ndarray:
    a = np.asarray(a, dtype=float)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2:
        raise ValueError(f"expected a [N, K] matrix of scores, got shape {a.shape}")
    return a


def margin_threshold(G, b: float) -> float:
    r"""The absolute threshold of a margin constraint: $t = \mathbb E_{\pi_{ref}}[g] + b$ (mean of `G`)."""
    return float(np.mean(G)) + float(b)


def _logits(lam: float, R, G, beta: float) -> np.ndarray:
    return (R + lam * G) / beta


def tilted_weights(lam: float, R, G, beta: float) -> np.ndarray:
    r"""Self-normalised weights of $\pi_\lambda$ on the K reference samples of each prompt:
    $w_{ik} = \mathrm{softmax}_k\bigl((R_{ik} + \lambda G_{ik})/\beta\bigr)$ (max-subtracted), shape [N, K]."""
    R, G = _as2d(R), _as2d(G)
    z = _logits(lam, R, G, beta)
    z = z - z.max(axis=1, keepdims=True)
    w = np.exp(z)
    return w / w.sum(axis=1, keepdims=True)


def weighted_stats(w, **values) -> dict:
    r"""Expectations of each [N, K] array in `values` under row weights `w` [N, K] (rows sum to 1), averaged
    over the N prompts, and the KL of the reweighted samples to the uniform ones,
    $\mathrm{KL} = \frac1N\sum_i\sum_k w_{ik}\log(K w_{ik})$ (the sample estimate of KL(pi_w || pi_ref))."""
    w = _as2d(w)
    out = {k: float(np.sum(w * _as2d(v), 1).mean()) for k, v in values.items()}
    K = w.shape[1]
    out["kl"] = float(np.sum(np.where(w > 0, w * np.log(np.maximum(w * K, 1e-300)), 0.0), 1).mean())
    return out


def tilted_stats(lam: float, R, G, beta: float) -> dict:
    r"""Predicted $\mathbb E_{\pi_\lambda}[r]$ (`reward`), $\mathbb E_{\pi_\lambda}[g]$ (`safety`) and
    $\mathrm{KL}(\pi_\lambda\|\pi_{ref})$ from the K reference samples (`weighted_stats` of `tilted_weights`)."""
    return weighted_stats(tilted_weights(lam, R, G, beta), reward=R, safety=G)


def dual_value(lam, R, G, threshold: float, beta: float) -> np.ndarray | float:
    r"""Empirical dual $\hat D(\lambda) = \beta\,\frac1N\sum_i \log\frac1K\sum_k
    \exp\bigl((R_{ik} + \lambda(G_{ik} - t))/\beta\bigr)$ (log-mean-exp with max subtraction per prompt).
    `lam` may be a scalar or an array (the value has its shape)."""
    R, G = _as2d(R), _as2d(G)
    lams = np.atleast_1d(np.asarray(lam, dtype=float))
    out = np.empty(lams.shape)
    for j, l in enumerate(lams.ravel()):
        z = _logits(l, R, G, beta)
        m = z.max(axis=1, keepdims=True)
        lme = m[:, 0] + np.log(np.mean(np.exp(z - m), axis=1))
        out.ravel()[j] = beta * lme.mean() - l * threshold
    return out.reshape(np.shape(lam)) if np.ndim(lam) else float(out[0])


def dual_grad(lam: float, R, G, threshold: float, beta: float) -> float:
    r"""$\hat D'(\lambda) = \frac1N\sum_i\sum_k w_{ik}(\lambda)\,G_{ik} - t$: the predicted constraint slack of
    $\pi_\lambda$ (negative = the constraint is violated)."""
    w = tilted_weights(lam, R, G, beta)
    return float(np.sum(w * _as2d(G), axis=1).mean() - threshold)


@dataclass
class DualSolution:
    """`lam` = lambda*; `feasible` False when the slack stays negative up to `lam_max` (the margin is beyond
    what the K samples reach: no finite minimiser); `slack` = D'(lam*); `trace` the PGD iterates."""

    lam: float
    feasible: bool
    slack: float
    value: float
    method: str
    iterations: int = 0
    trace: list = field(default_factory=list)


def solve_dual(R, G, threshold: float, beta: float, lam_max: float = 1e3, tol: float = 1e-10) -> DualSolution:
    r"""$\lambda^\star = \arg\min_{0\le\lambda\le\lambda_{max}} \hat D(\lambda)$ by root-finding on the monotone
    derivative (`scipy.optimize.brentq`; $\hat D$ is convex so $\hat D'$ is non-decreasing).
    $\hat D'(0)\ge0$: the constraint already holds at $\lambda = 0$, $\lambda^\star = 0$ (complementary slackness).
    $\hat D'(\lambda_{max}) < 0$: infeasible, `lam = lam_max`, `feasible = False`."""
    from scipy.optimize import brentq

    def grad(l):
        return dual_grad(l, R, G, threshold, beta)

    g0 = grad(0.0)
    if g0 >= 0:
        lam, ok = 0.0, True
    elif grad(lam_max) < 0:
        lam, ok = float(lam_max), False
    else:
        lam, ok = float(brentq(grad, 0.0, lam_max, xtol=tol, rtol=4 * np.finfo(float).eps)), True
    return DualSolution(lam, ok, grad(lam), float(dual_value(lam, R, G, threshold, beta)), "brentq")


def dual_pgd(R, G, threshold: float, beta: float, lam0: float = 1.0, lr: float = 2.0, iters: int = 200,
             tol: float = 1e-5, window: int = 5, restarts: int = 5, lam_max: float = 1e3) -> DualSolution:
    r"""Projected gradient descent $\lambda_{t+1} = [\lambda_t - \eta\,\hat D'(\lambda_t)]_+$ as in the official
    code: stop when $\lambda$ moved less than `tol` over the last `window` iterations; when it did not
    converge in `iters` steps (or the iterate leaves $[0, \lambda_{max}]$), halve $\eta$ and restart from
    `lam0`, at most `restarts` times. `trace` holds every iterate of the last attempt."""
    for attempt in range(restarts + 1):
        lam, trace = float(lam0), [float(lam0)]
        for t in range(iters):
            lam = max(0.0, lam - lr * dual_grad(lam, R, G, threshold, beta))
            trace.append(lam)
            if lam > lam_max or not np.isfinite(lam):
                break
            if len(trace) > window and abs(trace[-1] - trace[-1 - window]) < tol:
                g = dual_grad(lam, R, G, threshold, beta)
                return DualSolution(lam, True, g, float(dual_value(lam, R, G, threshold, beta)), "pgd",
                                    t + 1, trace)
        lr /= 2
    g = dual_grad(lam, R, G, threshold, beta)
    return DualSolution(lam, False, g, float(dual_value(lam, R, G, threshold, beta)), "pgd", iters, trace)


def pseudo_labels(r0, g0, r1, g1, lam: float, rng: np.random.Generator, temp: float = 1.0) -> np.ndarray:
    r"""MoCAN relabelling: $z = 1$ (response 1 preferred) with probability
    $\sigma\bigl(((r_1 + \lambda g_1) - (r_0 + \lambda g_0))/\text{temp}\bigr)$, drawn (not argmax: a
    Bradley-Terry draw keeps DPO's target $\pi_{ref}\exp((r+\lambda g)/\beta)$). Boolean array."""
    d = (np.asarray(r1, float) + lam * np.asarray(g1, float)) - (np.asarray(r0, float) + lam * np.asarray(g0, float))
    from scipy.special import expit

    return rng.random(d.shape) < expit(d / temp)


def primal_dual_step(lam: float, safety: float, threshold: float, eta: float) -> float:
    r"""The iterative baseline's dual update $\lambda \leftarrow [\lambda - \eta(\mathbb E_{\pi}[g] - t)]_+$ with
    the *measured* safety of the current policy (each round needs a new policy, unlike the one-shot
    $\lambda^\star$)."""
    return max(0.0, float(lam) - eta * (float(safety) - float(threshold)))


def pecan_threshold(S_ref, b: float, beta: float) -> float:
    r"""PeCAN's threshold on the implicit safety score $s = \log\pi_g/\pi_{ref}$ (known up to a per-prompt
    constant that cancels in the softmax): the margin $b$ in utility units is $b/\beta$ in log-ratio units and
    is measured from $\mathbb E_{\pi_{ref}}[s] = -\mathrm{KL}(\pi_{ref}\|\pi_g)$, so
    $t = \overline{S_{ref}} + b/\beta$ (use `dual_value` with `R` = H/1, `G` = S, beta = 1)."""
    return float(np.mean(S_ref)) + float(b) / float(beta)
