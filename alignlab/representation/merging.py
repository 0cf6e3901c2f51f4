"""Permutation alignment and merging of ReLU MLPs (Git Re-Basin's weight and activation matching) and the
singular-vector view of linear mode connectivity (Ito, Yamada, Kumagai 2024).

An MLP is a parameter dict {"W0", "b0", ..., "WL", "bL"} (float64 tensors): hidden layers 0..L-1 with ReLU,
then the linear output layer L, `forward(p, x) = W_L relu(... relu(W_0 x + b_0) ...) + b_L`. A permutation is
a list of L index tensors, one per hidden layer; `permute(p, perms)` reorders hidden unit i <- perms[l][i]:
    W_l <- P_l W_l P_{l-1}^T,  b_l <- P_l b_l   (P_{-1} = P_L = I: inputs and outputs are never permuted),
which leaves the function unchanged and every singular value of every W_l unchanged.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

Params = dict[str, torch.Tensor]


# -- parameter dicts -----------------------------------------------------------------------------------------
def mlp_params(model: torch.nn.Module, dtype=torch.float64) -> Params:
    """The Linear layers of `nets.MLP(..., bn=False)` (body then head) as {"W0", "b0", ..., "WL", "bL"}."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ValueError("merging expects an MLP without BatchNorm (bn=False)")
    out = {}
    for i, lin in enumerate(linears):
        out[f"W{i}"] = lin.weight.detach().to(dtype).clone()
        out[f"b{i}"] = lin.bias.detach().to(dtype).clone()
    return out


def n_hidden(p: Params) -> int:
    """Number of hidden (permutable) layers L."""
    return len([k for k in p if k.startswith("W")]) - 1


def forward(p: Params, x: torch.Tensor, return_hidden: bool = False):
    """Logits of the MLP `p` on x (flattened); with `return_hidden`, also the post-ReLU activations."""
    h = x.reshape(len(x), -1).to(p["W0"].dtype)
    hidden = []
    for i in range(n_hidden(p)):
        h = torch.relu(h @ p[f"W{i}"].T + p[f"b{i}"])
        hidden.append(h)
    L = n_hidden(p)
    logits = h @ p[f"W{L}"].T + p[f"b{L}"]
    return (logits, hidden) if return_hidden else logits


def identity_perms(p: Params) -> list[torch.Tensor]:
    return [torch.arange(len(p[f"b{i}"])) for i in range(n_hidden(p))]


def permute(p: Params, perms: Sequence[torch.Tensor]) -> Params:
    """pi(p): W_l <- P_l W_l P_{l-1}^T, b_l <- P_l b_l with (P_l h)_i = h_{perms[l][i]}.
    The function is unchanged."""
    L = n_hidden(p)
    if len(perms) != L:
        raise ValueError(f"need {L} permutations, got {len(perms)}")
    out = {}
    for i in range(L + 1):
        W, b = p[f"W{i}"], p[f"b{i}"]
        if i < L:
            W, b = W[perms[i]], b[perms[i]]
        if i > 0:
            W = W[:, perms[i - 1]]
        out[f"W{i}"], out[f"b{i}"] = W.clone(), b.clone()
    return out


def compose(outer: Sequence[torch.Tensor], inner: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The permutation of permute(permute(p, inner), outer)."""
    return [q[o] for q, o in zip(inner, outer)]


def inverse(perms: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.argsort(q) for q in perms]


def interpolate(pa: Params, pb: Params, lam: float) -> Params:
    """(1 - lam) theta_a + lam theta_b, parameter by parameter."""
    return {k: (1 - lam) * pa[k] + lam * pb[k] for k in pa}


def average(params: Sequence[Params]) -> Params:
    """The uniform average of several (already aligned) models: the merged model."""
    return {k: torch.stack([q[k] for q in params]).mean(0) for k in params[0]}


def flat(p: Params) -> torch.Tensor:
    return torch.cat([p[k].reshape(-1) for k in sorted(p)])


def l2_distance(pa: Params, pb: Params) -> float:
    """||theta_a - theta_b||_2 over all parameters."""
    return float(torch.linalg.vector_norm(flat(pa) - flat(pb)))


def inner(pa: Params, pb: Params) -> float:
    """<theta_a, theta_b> = sum_l <W_l^a, W_l^b>_F + <b_l^a, b_l^b>: what weight matching maximises."""
    return float(flat(pa) @ flat(pb))


# -- permutation search --------------------------------------------------------------------------------------
def _assignment(score: torch.Tensor) -> torch.Tensor:
    _, col = linear_sum_assignment(score.detach().cpu().numpy(), maximize=True)
    return torch.as_tensor(col, dtype=torch.long)


def weight_matching(pa: Params, pb: Params, max_sweeps: int = 100, seed: int = 0,
                    init: Sequence[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], dict]:
    """Weight matching (Ainsworth et al. 2023): maximise
        sum_l <W_l^a, P_l W_l^b P_{l-1}^T>_F + <b_l^a, P_l b_l^b>
    (= minimise ||theta_a - pi(theta_b)||, since permutations keep ||theta_b||) by coordinate descent.

    With the other permutations fixed, P_l only enters layers l and l+1, and the objective is linear in P_l:
        S_l[i, j] = <W_l^a[i], (W_l^b P_{l-1}^T)[j]> + b_l^a[i] b_l^b[j]
                    + <W_{l+1}^a[:, i], (P_{l+1} W_{l+1}^b)[:, j]>,
    a linear assignment problem (scipy's `linear_sum_assignment`). Layers are visited in a random order each
    sweep; it stops when a sweep changes no P_l. Returns the permutations of theta_b and
    {"sweeps", "objective" (per sweep)}."""
    L = n_hidden(pa)
    rng = np.random.default_rng(seed)
    perms = [q.clone() for q in init] if init is not None else identity_perms(pb)
    history = [inner(pa, permute(pb, perms))]
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        changed = False
        for l in rng.permutation(L):
            Wb = pb[f"W{l}"] if l == 0 else pb[f"W{l}"][:, perms[l - 1]]
            S = pa[f"W{l}"] @ Wb.T + torch.outer(pa[f"b{l}"], pb[f"b{l}"])
            Wn = pb[f"W{l + 1}"] if l + 1 == L else pb[f"W{l + 1}"][perms[l + 1]]
            S = S + pa[f"W{l + 1}"].T @ Wn
            new = _assignment(S)
            # accept only a strict improvement (ties keep the current permutation, so the loop terminates)
            old_val = S[torch.arange(len(new)), perms[l]].sum()
            if not torch.equal(new, perms[l]) and S[torch.arange(len(new)), new].sum() > old_val + 1e-12:
                perms[l], changed = new, True
        history.append(inner(pa, permute(pb, perms)))
        if not changed:
            break
    return perms, {"sweeps": sweeps, "objective": history}


def activation_matching(pa: Params, pb: Params, x: torch.Tensor) -> list[torch.Tensor]:
    """Activation matching: for each hidden layer, the permutation of theta_b's units maximising
    sum_i <z_i^a, z_{P(i)}^b> over the data x (post-ReLU activations, each unit standardised: a correlation).
    Each layer is independent of the others (relabelling earlier layers does not change a unit's
    activations)."""
    _, ha = forward(pa, x, return_hidden=True)
    _, hb = forward(pb, x, return_hidden=True)
    perms = []
    for za, zb in zip(ha, hb):
        za = (za - za.mean(0)) / (za.std(0) + 1e-8)
        zb = (zb - zb.mean(0)) / (zb.std(0) + 1e-8)
        perms.append(_assignment(za.T @ zb / len(x)))
    return perms


# -- loss along the line and barriers ------------------------------------------------------------------------
@torch.no_grad()
def loss_acc(p: Params, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of the MLP p on (x, y)."""
    logits = forward(p, x)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).double().mean())


def path(pa: Params, pb: Params, x: torch.Tensor, y: torch.Tensor, lams) -> dict[str, np.ndarray]:
    """Loss and accuracy of (1 - lam) theta_a + lam theta_b for every lam."""
    vals = np.array([loss_acc(interpolate(pa, pb, float(lam)), x, y) for lam in lams])
    return {"lam": np.asarray(lams, dtype=float), "loss": vals[:, 0], "acc": vals[:, 1]}


def barrier(values, lams, higher_is_worse: bool = True) -> float:
    """B = max_lam [ v(lam) - ((1 - lam) v(0) + lam v(1)) ] (loss); for accuracy (higher_is_worse=False) the
    sign is flipped: the largest drop below the straight line between the endpoints. lams must start at 0 and
    end at 1."""
    v, lam = np.asarray(values, dtype=float), np.asarray(lams, dtype=float)
    if not (np.isclose(lam[0], 0) and np.isclose(lam[-1], 1)):
        raise ValueError("lams must run from 0 to 1")
    gap = v - ((1 - lam) * v[0] + lam * v[-1])
    return float(gap.max() if higher_is_worse else (-gap).max())


# -- singular-vector analysis --------------------------------------------------------------------------------
def svd(W: torch.Tensor):
    """Thin SVD in float64: (U, sigma, V) with W = U diag(sigma) V^T, sigma descending."""
    U, s, Vh = torch.linalg.svd(W.to(torch.float64), full_matrices=False)
    return U, s, Vh.T


def component_agreement(Wa: torch.Tensor, Wb: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """For each of the top-k rank-one components sigma_i u_i v_i^T of W_a, the best |cosine| with a component
    of W_b:  s_i = max_j |<u_i^a, u_j^b>| |<v_i^a, v_j^b>|
    (= |<u_i^a v_i^a^T, u_j^b v_j^b^T>_F|; sign-free)."""
    Ua, _, Va = svd(Wa)
    Ub, _, Vb = svd(Wb)
    k = k or Ua.shape[1]
    cos = (Ua[:, :k].T @ Ub).abs() * (Va[:, :k].T @ Vb).abs()
    return cos.max(1).values


def singular_agreement(Wa: torch.Tensor, Wb: torch.Tensor, k: int = 10) -> float:
    """Sigma-weighted top-k agreement  A_k = sum_{i<=k} sigma_i^a s_i / sum_{i<=k} sigma_i^a  in [0, 1]
    (our stand-in for the paper's R; see `alignment_ratio` for a parameter-free companion)."""
    _, sa, _ = svd(Wa)
    k = min(k, len(sa))
    s = component_agreement(Wa, Wb, k)
    return float((sa[:k] * s).sum() / sa[:k].sum())


def alignment_ratio(Wa: torch.Tensor, Wb: torch.Tensor) -> float:
    """<W_a, W_b>_F / sum_i sigma_i^a sigma_i^b in [-1, 1]. Writing both SVDs,
    <W_a, W_b>_F = sum_{i,j} sigma_i^a sigma_j^b <u_i^a, u_j^b><v_i^a, v_j^b>, and von Neumann's trace
    inequality bounds it by sum_i sigma_i^a sigma_i^b, reached iff the singular vectors coincide in order.
    Permutations cannot change the sigmas, so WM can raise this layer's term only by aligning singular
    vectors."""
    _, sa, _ = svd(Wa)
    _, sb, _ = svd(Wb)
    return float((Wa.to(torch.float64) * Wb.to(torch.float64)).sum() / (sa * sb).sum())


def truncate(W: torch.Tensor, r: int) -> torch.Tensor:
    """The best rank-r approximation sum_{i<=r} sigma_i u_i v_i^T."""
    U, s, V = svd(W)
    return (U[:, :r] * s[:r]) @ V[:, :r].T


def truncate_params(p: Params, r: int) -> Params:
    """Every weight matrix replaced by its rank-min(r, rank) truncation (biases kept)."""
    return {k: (truncate(v, min(r, min(v.shape))) if k.startswith("W") else v.clone()) for k, v in p.items()}


# -- multi-model merging -------------------------------------------------------------------------------------
def align_all(reference: Params, others: Sequence[Params], method: str = "wm", x: torch.Tensor | None = None,
              seed: int = 0) -> list[Params]:
    """Every model of `others` permuted onto `reference` ("wm": weight matching, "am": activation matching
    on x, "naive": unchanged)."""
    out = []
    for i, q in enumerate(others):
        if method == "naive":
            out.append(q)
        elif method == "wm":
            out.append(permute(q, weight_matching(reference, q, seed=seed + i)[0]))
        elif method == "am":
            if x is None:
                raise ValueError("activation matching needs data x")
            out.append(permute(q, activation_matching(reference, q, x)))
        else:
            raise ValueError(f"unknown method {method!r}; valid: naive, wm, am")
    return out


def merge(models: Sequence[Params], method: str = "wm", x: torch.Tensor | None = None,
          seed: int = 0) -> Params:
    """Average of models[0] and models[1:] aligned to it (the first model is the reference)."""
    return average([models[0], *align_all(models[0], models[1:], method, x, seed)])
