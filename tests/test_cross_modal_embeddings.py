"""Embedding-space alignment (alignlab.cross_modal.embeddings): Procrustes against scipy, CSLS and precision@k
against hand computations, RCSLS against a loop over the definition, the synthetic language pair's bookkeeping."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.linalg import orthogonal_procrustes

from alignlab.cross_modal import embeddings as E


def _unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_normalize_follows_the_muse_recipe():
    x = torch.randn(50, 8) * 3 + 2
    y = E.normalize(x)
    c = F.normalize(x, dim=1)
    c = F.normalize(c - c.mean(0), dim=1)
    assert torch.allclose(y, c, atol=1e-6)
    assert torch.allclose(E.normalize(x, "center").mean(0), torch.zeros(8), atol=1e-5)
    assert torch.equal(E.normalize(x, ""), x)
    with pytest.raises(ValueError):
        E.normalize(x, "whiten")


def test_procrustes_recovers_a_known_rotation_and_matches_scipy():
    x = _unit(200, 16, 0)
    Q = E.random_orthogonal(16, torch.Generator().manual_seed(1))
    assert torch.allclose(Q @ Q.T, torch.eye(16), atol=1e-5)
    z = E.apply(Q, x)                                  # z_i = Q x_i
    W = E.procrustes(x, z)
    assert torch.allclose(W, Q, atol=1e-4)
    # with noise: the same minimiser as scipy (which solves min ||A R - B||, R = W^T for rows A = X, B = Z)
    zn = z + 0.3 * torch.randn(z.shape, generator=torch.Generator().manual_seed(2))
    R, _ = orthogonal_procrustes(x.double().numpy(), zn.double().numpy())
    assert np.allclose(E.procrustes(x, zn).T.numpy(), R, atol=1e-5)
    with pytest.raises(ValueError):
        E.procrustes(x, z[:10])


def test_csls_closed_form_on_a_tiny_example():
    # three queries and three targets in 2-D, k = 1 and k = 2, worked out by hand from the cosine matrix
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    z = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 2.0]])
    cos = F.normalize(q, dim=1) @ F.normalize(z, dim=1).T
    s = 2 ** -0.5
    assert torch.allclose(cos, torch.tensor([[1, 0.6, 0], [0, 0.8, 1], [s, 1.4 * s, s]]), atol=1e-6)
    r_q = torch.tensor([1.0, 1.0, 1.4 * s])            # k = 1: best cosine of each query among the targets
    r_z = torch.tensor([1.0, 1.4 * s, 1.0])            # k = 1: best cosine of each target among the queries
    assert torch.allclose(E.csls(q, z, k=1), 2 * cos - r_q[:, None] - r_z[None, :], atol=1e-6)
    r_q2 = torch.tensor([0.8, 0.9, (s + 1.4 * s) / 2])  # k = 2: mean of the two best
    r_z2 = torch.tensor([(1 + s) / 2, (0.8 + 1.4 * s) / 2, (1 + s) / 2])
    assert torch.allclose(E.csls(q, z, k=2), 2 * cos - r_q2[:, None] - r_z2[None, :], atol=1e-6)
    # the target-side neighbourhoods come from `source` (the whole mapped vocabulary) when given
    src = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    r_z_src = torch.tensor([0.0, 0.8, 1.0])
    assert torch.allclose(E.csls(q, z, k=1, source=src), 2 * cos - r_q[:, None] - r_z_src[None, :], atol=1e-6)


def test_csls_demotes_a_hub():
    # queries e0 + 0.5 e_i; target 0 is the hub e0, target i is 0.3 e0 + e_i (the right translation).
    # By cosine the hub is every query's nearest target; CSLS discounts it, since it is also close to many
    # other (mapped) source words, and retrieves the right targets.
    eye = torch.eye(4)
    q = eye[0] + 0.5 * eye[1:]
    z = torch.cat([eye[:1], 0.3 * eye[0] + eye[1:]])
    source = torch.cat([q, eye[:1].repeat(3, 1)])
    assert E.retrieve(q, z, 1, "nn")[:, 0].tolist() == [0, 0, 0]
    assert E.retrieve(q, z, 1, "csls", k=2, source=source)[:, 0].tolist() == [1, 2, 3]
    with pytest.raises(ValueError):
        E.retrieve(q, z, 1, "cosine")


def test_precision_at_k_counts_any_gold_translation():
    ranked = torch.tensor([[3, 1, 2], [0, 2, 1], [2, 0, 1], [1, 0, 3]])
    gold = [3, {1, 2}, [1], torch.tensor(9)]
    p = E.precision_at_k(ranked, gold, ks=(1, 2, 3))
    assert p == {1: 0.25, 2: 0.5, 3: 0.75}
    with pytest.raises(ValueError):
        E.precision_at_k(ranked, gold, ks=(5,))
    with pytest.raises(ValueError):
        E.precision_at_k(ranked, gold[:2])


def test_rcsls_loss_matches_its_definition_and_gradient():
    x, z, nx, nz = _unit(6, 5, 0), _unit(6, 5, 1), _unit(9, 5, 2), _unit(9, 5, 3)
    W = torch.eye(5) + 0.1 * torch.randn(5, 5, generator=torch.Generator().manual_seed(4))
    k = 3
    total = torch.tensor(0.0)
    for i in range(6):
        wx = W @ x[i]
        total += -2 * z[i] @ wx
        total += sum(sorted((nz @ wx).tolist())[-k:]) / k
        total += sum(sorted([(z[i] @ (W @ nx[j])).item() for j in range(9)])[-k:]) / k
    assert E.rcsls_loss(W, x, z, nx, nz, k).item() == pytest.approx(float(total) / 6, abs=1e-5)
    # the gradient with neighbour sets held fixed (fastText's analytic form), by finite differences
    Wg = W.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(E.rcsls_loss(Wg, x, z, nx, nz, k), Wg)
    eps = 1e-3
    D = torch.zeros(5, 5)
    D[1, 2] = eps
    fd = (E.rcsls_loss(W + D, x, z, nx, nz, k) - E.rcsls_loss(W - D, x, z, nx, nz, k)) / (2 * eps)
    assert g[1, 2].item() == pytest.approx(fd.item(), abs=1e-3)


def test_rcsls_lowers_its_loss_and_the_spectral_projection_bounds_the_norm():
    x = E.normalize(torch.randn(300, 12, generator=torch.Generator().manual_seed(0)))
    pair = E.language_pair(x, stretch=0.5, noise=0.3, seed=1)
    Z = E.normalize(pair["z"])
    pairs = torch.stack([torch.arange(200), pair["gold"][:200]], 1)
    out = E.rcsls(x, Z, pairs, k=5, iters=15, lr=1.0)
    assert len(out["loss"]) >= 2 and out["loss"][-1] < out["loss"][0]
    assert all(b <= a + 1e-6 for a, b in zip(out["loss"], out["loss"][1:]))     # undo-and-halve never accepts a rise
    Ws = E.rcsls(x, Z, pairs, k=5, iters=5, lr=1.0, spectral=True)["W"]
    assert torch.linalg.matrix_norm(Ws, ord=2).item() <= 1 + 1e-4
    assert torch.linalg.svdvals(E.project_spectral(3 * torch.eye(4))).tolist() == pytest.approx([1.0] * 4)


def test_language_pair_gold_indices_and_the_isometric_case():
    x = E.normalize(torch.randn(400, 16, generator=torch.Generator().manual_seed(0)))
    extra = E.normalize(torch.randn(50, 16, generator=torch.Generator().manual_seed(1)))
    pair = E.language_pair(x, extra, drop=0.25, seed=3)
    gold, z = pair["gold"], pair["z"]
    assert len(z) == int((gold >= 0).sum()) + 50
    kept = gold >= 0
    assert 0.15 < 1 - kept.float().mean() < 0.35
    assert len(set(gold[kept].tolist())) == int(kept.sum())                     # distinct target rows
    assert torch.allclose(z[gold[kept]], E.apply(pair["Q"], x[kept]), atol=1e-5)  # no distortion: a pure rotation
    # Procrustes on a dictionary of the rotated pair retrieves every test word
    d = E.dictionary(gold, 100, 50, seed=0)
    assert not set(d["train"][:, 0].tolist()) & set(d["test"].tolist())
    W = E.procrustes(x[d["train"][:, 0]], z[d["train"][:, 1]])
    top = E.retrieve(E.apply(W, x[d["test"]]), z, 1, "csls", source=E.apply(W, x))
    assert E.precision_at_k(top, d["test_gold"].tolist(), (1,))[1] == 1.0


def test_distortions_make_alignment_harder_and_dictionary_noise_is_counted():
    x = E.normalize(torch.randn(600, 24, generator=torch.Generator().manual_seed(0)))

    def p1(**kw):
        pair = E.language_pair(x, seed=0, **kw)
        z = E.normalize(pair["z"])
        d = E.dictionary(pair["gold"], 200, 100, seed=0)
        W = E.procrustes(x[d["train"][:, 0]], z[d["train"][:, 1]])
        return E.precision_at_k(E.retrieve(E.apply(W, x[d["test"]]), z, 1), d["test_gold"].tolist(), (1,))[1]

    clean = p1(noise=0.5)
    assert clean == 1.0
    assert p1(noise=0.5, stretch=1.0) < 0.95 and p1(noise=0.5, warp=3.0) < 0.95 and p1(noise=1.0) < 0.95
    gold = torch.arange(100)
    d = E.dictionary(gold, 60, 20, wrong=0.1, seed=0)
    assert int((d["train"][:, 1] != gold[d["train"][:, 0]]).sum()) <= 6
    assert (d["train"][6:, 1] == gold[d["train"][6:, 0]]).all()
    with pytest.raises(ValueError):
        E.dictionary(gold, 90, 20)


def test_refinement_induces_mutual_neighbours():
    x = _unit(100, 8, 0)
    Q = E.random_orthogonal(8, torch.Generator().manual_seed(1))
    z = E.apply(Q, x)
    d = E.induce_dictionary(E.apply(Q, x), z)
    assert len(d) == 100 and torch.equal(d[:, 0], d[:, 1])
    W0 = E.procrustes(x[:4], z[:4])                     # a poor start from 4 pairs in 8-D
    assert torch.allclose(E.refine(x, z, Q, rounds=1), Q, atol=1e-4)
    assert (E.refine(x, z, W0, rounds=3) - Q).norm() < (W0 - Q).norm()
