r"""Supervised alignment of two word-embedding spaces (bilingual lexicon induction), as benchmarked for
Sinhala-English by Wickramasinghe & de Silva (PACLIC 2023, arXiv 2311.10436) with MUSE and fastText's RCSLS.

Rows are words. A source matrix $X$ (n_x, d) and a target matrix $Z$ (n_z, d); a dictionary of index pairs
$D = \{(i, j)\}$ says that source word $i$ translates to target word $j$. A linear map $W$ (d, d) sends a source
row $x$ to $Wx$, i.e. the whole matrix to ``X @ W.T`` (`apply`).

    X, Z = normalize(X), normalize(Z)                 # MUSE "renorm,center,renorm"
    W = procrustes(X[D[:, 0]], Z[D[:, 1]])            # orthogonal, closed form
    W = rcsls(X, Z, D, W0=W)["W"]                     # relaxed-CSLS refinement of W
    top = retrieve(apply(W, X[test]), Z, 5, "csls", source=apply(W, X))
    precision_at_k(top, gold)                         # {1: P@1, 5: P@5}

Also: `csls` (the hubness-corrected score), `refine` (MUSE's Procrustes refinement on an induced dictionary) and
`language_pair` / `dictionary` (a synthetic "second language" built from real embeddings, see their docstrings).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


# -- preprocessing ---------------------------------------------------------------------------------------------
def normalize(x: torch.Tensor, ops: str = "renorm,center,renorm") -> torch.Tensor:
    """MUSE's `normalize_embeddings`: a comma-separated list applied in order. "renorm" scales every row to unit
    norm, "center" subtracts the mean row (over the whole vocabulary), "" does nothing."""
    x = x.float().clone()
    for op in [o.strip() for o in ops.split(",") if o.strip()]:
        if op == "renorm":
            x = F.normalize(x, dim=1)
        elif op == "center":
            x = x - x.mean(0, keepdim=True)
        else:
            raise ValueError(f"unknown normalisation {op!r}; use 'renorm' and/or 'center'")
    return x


def apply(W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Map source rows with W: row x -> W x, i.e. ``x @ W.T``."""
    return x @ W.T


# -- Procrustes ----------------------------------------------------------------------------------------------
def procrustes(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    r"""Orthogonal Procrustes for paired rows x_i -> z_i:

    $W^\star = \arg\min_{W^\top W = I} \sum_i \|W x_i - z_i\|^2 = U V^\top$, with $U \Sigma V^\top = \mathrm{SVD}(Z^\top X)$.
    Returns W (d, d); apply it as ``x @ W.T``."""
    if x.shape != z.shape:
        raise ValueError(f"procrustes needs paired rows of equal shape, got {tuple(x.shape)} and {tuple(z.shape)}")
    U, _, Vh = torch.linalg.svd(z.double().T @ x.double())
    return (U @ Vh).to(x.dtype)


# -- retrieval -------------------------------------------------------------------------------------------------
def knn_mean_similarity(q: torch.Tensor, keys: torch.Tensor, k: int = 10, batch: int = 4096) -> torch.Tensor:
    r"""$r_K(q) = \frac1k \sum_{y \in N_k(q)} \cos(q, y)$: mean cosine of each row of q to its k nearest rows of keys."""
    q, keys = F.normalize(q, dim=1), F.normalize(keys, dim=1)
    k = min(k, len(keys))
    return torch.cat([(q[i:i + batch] @ keys.T).topk(k, dim=1).values.mean(1) for i in range(0, len(q), batch)])


def csls(q: torch.Tensor, z: torch.Tensor, k: int = 10, source: torch.Tensor | None = None) -> torch.Tensor:
    r"""Cross-domain similarity local scaling (Conneau et al. 2018) between mapped queries q (rows $Wx$) and targets z:

    $\mathrm{CSLS}(Wx, z) = 2\cos(Wx, z) - r_Z(Wx) - r_X(z)$,
    $r_Z(Wx)$ = mean cosine of $Wx$ to its k nearest targets, $r_X(z)$ = mean cosine of z to its k nearest
    *mapped source* words. `source` is the whole mapped source vocabulary ($WX$; default: q itself), since the
    neighbourhoods are those of the full vocabularies, not of the test queries. Returns (len(q), len(z))."""
    src = q if source is None else source
    cos = F.normalize(q, dim=1) @ F.normalize(z, dim=1).T
    return 2 * cos - knn_mean_similarity(q, z, k)[:, None] - knn_mean_similarity(z, src, k)[None, :]


def retrieve(q: torch.Tensor, z: torch.Tensor, topk: int = 10, criterion: str = "nn", *, k: int = 10,
             source: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (len(q), topk) of the best targets for each mapped query, best first: by cosine ("nn") or by
    `csls` with k neighbours ("csls")."""
    if criterion == "nn":
        scores = F.normalize(q, dim=1) @ F.normalize(z, dim=1).T
    elif criterion == "csls":
        scores = csls(q, z, k, source)
    else:
        raise ValueError(f"unknown retrieval criterion {criterion!r}; use 'nn' or 'csls'")
    return scores.topk(min(topk, scores.shape[1]), dim=1).indices


def precision_at_k(ranked: torch.Tensor, gold: Sequence, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Precision@k of bilingual lexicon induction: the fraction of queries with at least one of their gold
    translations (an int or a collection of target indices per query) among the first k retrieved."""
    if len(ranked) != len(gold):
        raise ValueError(f"{len(ranked)} ranked lists for {len(gold)} gold entries")
    if len(gold) == 0:
        raise ValueError("precision_at_k needs at least one query")
    gold_sets = [{int(g)} if isinstance(g, int) or (torch.is_tensor(g) and g.ndim == 0) else {int(t) for t in g}
                 for g in gold]
    out = {}
    for kk in ks:
        if kk > ranked.shape[1]:
            raise ValueError(f"P@{kk} needs at least {kk} retrieved targets per query, got {ranked.shape[1]}")
        hits = [bool(gold_sets[i] & set(ranked[i, :kk].tolist())) for i in range(len(gold_sets))]
        out[kk] = sum(hits) / len(hits)
    return out


# -- RCSLS -----------------------------------------------------------------------------------------------------
def rcsls_loss(W: torch.Tensor, x: torch.Tensor, z: torch.Tensor, neg_x: torch.Tensor, neg_z: torch.Tensor,
               k: int = 10) -> torch.Tensor:
    r"""The relaxed CSLS loss of Joulin et al. (2018) for paired unit rows (x_i, z_i), i = 1..n:

    $\frac1n \sum_i \big[-2\, z_i^\top W x_i + \frac1k \sum_{z \in N_k(W x_i)} z^\top W x_i
    + \frac1k \sum_{x \in N_k(z_i)} z_i^\top W x\big]$,
    where $N_k(Wx_i)$ are the k target negatives (rows of neg_z) closest to $W x_i$ and $N_k(z_i)$ the k source
    negatives (rows of neg_x, mapped by W) closest to $z_i$. The neighbour sets are re-selected at every call;
    autograd through `topk` gives the same (sub)gradient as fastText's hand-written one."""
    wx = apply(W, x)
    k = min(k, len(neg_z), len(neg_x))
    fit = -2 * (wx * z).sum(1)
    hub_src = (wx @ neg_z.T).topk(k, dim=1).values.mean(1)
    hub_tgt = (z @ apply(W, neg_x).T).topk(k, dim=1).values.mean(1)
    return (fit + hub_src + hub_tgt).mean()


def project_spectral(W: torch.Tensor) -> torch.Tensor:
    """Clip the singular values of W to [0, 1] (RCSLS's optional "spectral" constraint: the unit ball of the
    spectral norm, the convex hull of the orthogonal matrices)."""
    U, s, Vh = torch.linalg.svd(W)
    return U @ torch.diag(s.clamp(0, 1)) @ Vh


def rcsls(X: torch.Tensor, Z: torch.Tensor, pairs: torch.Tensor, *, W0: torch.Tensor | None = None, k: int = 10,
          iters: int = 20, lr: float = 1.0, max_neg: int | None = None, spectral: bool = False) -> dict:
    """Minimise `rcsls_loss` over W by full-batch gradient descent, as fastText's `align.py` does: start from
    Procrustes (or W0), step W <- W - lr * grad, and whenever the loss went up, undo the step and halve lr (stop
    when lr < 1e-4). Negatives are the first `max_neg` rows of X and Z (the most frequent words; all by default).

    Returns {"W": the last accepted W, "loss": the loss history}. Unlike the paper's `align_si.py` there is no
    early stopping on test accuracy (that selects the iterate on the test dictionary)."""
    x, z = X[pairs[:, 0]], Z[pairs[:, 1]]
    neg_x, neg_z = X[:max_neg], Z[:max_neg]
    W = (procrustes(x, z) if W0 is None else W0).clone().float()
    losses, prev, prev_W, prev_g = [], None, W, None
    for _ in range(iters + 1):
        if lr < 1e-4:
            break
        Wg = W.clone().requires_grad_(True)
        f = rcsls_loss(Wg, x, z, neg_x, neg_z, k)
        (g,) = torch.autograd.grad(f, Wg)
        f = f.item()
        if prev is not None and f > prev:   # the last step made things worse: undo it and halve the step size
            lr /= 2
            W, f, g = prev_W, prev, prev_g
        else:
            losses.append(f)
        prev, prev_W, prev_g = f, W, g
        W = W - lr * g
        if spectral:
            W = project_spectral(W)
    return {"W": prev_W.detach(), "loss": losses}


# -- refinement -------------------------------------------------------------------------------------------------
def induce_dictionary(WX: torch.Tensor, Z: torch.Tensor, k: int = 10, max_rank: int | None = None) -> torch.Tensor:
    """MUSE's refinement dictionary: the pairs (i, j) that are mutual CSLS nearest neighbours (j is the best target
    of i and i the best source of j) among the first `max_rank` words of each side. Returns (m, 2) indices."""
    a, b = WX[:max_rank], Z[:max_rank]
    s = csls(a, b, k, source=a)
    fwd = s.argmax(1)
    bwd = s.argmax(0)
    i = torch.arange(len(a), device=s.device)
    keep = bwd[fwd] == i
    return torch.stack([i[keep], fwd[keep]], 1)


def refine(X: torch.Tensor, Z: torch.Tensor, W: torch.Tensor, rounds: int = 1, k: int = 10,
           max_rank: int | None = None) -> torch.Tensor:
    """MUSE's Procrustes refinement: `rounds` times, induce a dictionary from the current map (`induce_dictionary`)
    and refit Procrustes on it (the seed dictionary is not reused)."""
    for _ in range(rounds):
        d = induce_dictionary(apply(W, X), Z, k, max_rank)
        W = procrustes(X[d[:, 0]], Z[d[:, 1]])
    return W


# -- a synthetic second language from real embeddings ----------------------------------------------------------
def random_orthogonal(d: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian with the signs of R's diagonal fixed)."""
    q, r = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def language_pair(x: torch.Tensor, extra: torch.Tensor | None = None, *, stretch: float = 0.0, warp: float = 0.0,
                  noise: float = 0.0, drop: float = 0.0, gain: float = 2.0, seed: int = 0) -> dict:
    r"""A target "language" for source words with unit rows x (n, d): each kept word gets the target vector

    $z = Q\,\frac{y}{\|y\|} + \sigma \epsilon$,  $y = S\,\big(x + \beta\, \tanh(g A x)/\sqrt d\big)$,  $\epsilon \sim \mathcal N(0, I/d)$,

    with Q, R random orthogonal, $S = R\,\mathrm{diag}(e^{a u})\,R^\top$ ($u \sim \mathcal N(0, I)$) and
    $A_{jl} \sim \mathcal N(0, 1)$ (so $Ax$ has unit-variance entries and $\tanh(gAx)/\sqrt d$ a norm below 1).

    - stretch a: an anisotropic *linear* distortion; a = 0 keeps the map orthogonal. A general linear map (RCSLS)
      can learn it back, an orthogonal one (Procrustes) cannot.
    - warp $\beta$ (gain g): a non-linear distortion no linear map can undo (the two spaces are not isomorphic).
    - noise $\sigma$: per-word noise of norm about $\sigma$ relative to the unit clean vector (embeddings trained
      on a small corpus).
    - drop: the fraction of source words without a translation in the target vocabulary; `extra` (m, d): real
      words only the target language has (distractors for retrieval), passed through the same map.

    a = beta = drop = 0 and no extra words make Z an exactly rotated X plus noise (an isometric pair).
    Target rows are shuffled. Returns {"z": (n_z, d), "gold": (n,) target row of each source word's translation
    (-1 when dropped), "Q": Q}."""
    g = torch.Generator().manual_seed(seed)
    n, d = x.shape
    Q = random_orthogonal(d, g)
    R = random_orthogonal(d, g)
    S = (R * torch.exp(stretch * torch.randn(d, generator=g))) @ R.T
    A = torch.randn(d, d, generator=g)
    keep = torch.rand(n, generator=g) >= drop
    words = torch.cat([x[keep], extra]) if extra is not None else x[keep]
    clean = F.normalize((words + warp * torch.tanh(gain * words @ A.T) / d ** 0.5) @ S.T, dim=1)
    z = clean @ Q.T + noise * torch.randn(words.shape, generator=g) / d ** 0.5
    perm = torch.randperm(len(words), generator=g)
    z = z[perm]
    pos = torch.empty_like(perm)
    pos[perm] = torch.arange(len(perm))            # pos[r] = the shuffled position of row r
    gold = torch.full((n,), -1, dtype=torch.long)
    gold[keep] = pos[: int(keep.sum())]
    return {"z": z, "gold": gold, "Q": Q}


def dictionary(gold: torch.Tensor, n_train: int, n_test: int, *, wrong: float = 0.0, n_targets: int | None = None,
               test_from: int = 0, seed: int = 0) -> dict:
    """Split the translatable source words (gold >= 0) into a training dictionary of n_train pairs and a disjoint
    test set of n_test source words, drawn at random (test words among source indices >= `test_from`, e.g. to test
    on rarer words). A fraction `wrong` of the training pairs gets a random wrong target (a noisy dictionary).
    Returns {"train": (n_train, 2) pairs, "test": (n_test,) source indices, "test_gold": their targets}."""
    g = torch.Generator().manual_seed(seed)
    ok = torch.nonzero(gold >= 0).flatten()
    cand_test = ok[ok >= test_from]
    test = cand_test[torch.randperm(len(cand_test), generator=g)[:n_test]]
    if len(test) < n_test:
        raise ValueError(f"only {len(test)} translatable words for a test set of {n_test}")
    rest = ok[~torch.isin(ok, test)]
    if len(rest) < n_train:
        raise ValueError(f"only {len(rest)} translatable words left for a dictionary of {n_train}")
    train_src = rest[torch.randperm(len(rest), generator=g)[:n_train]]
    tgt = gold[train_src].clone()
    n_wrong = int(round(wrong * n_train))
    if n_wrong:
        n_targets = n_targets if n_targets is not None else int(gold.max()) + 1
        tgt[:n_wrong] = torch.randint(0, n_targets, (n_wrong,), generator=g)
    return {"train": torch.stack([train_src, tgt], 1), "test": test, "test_gold": gold[test]}
