"""Tests of alignlab.representation.merging: permutation symmetry, weight/activation matching, barriers,
singular values."""

import numpy as np
import pytest
import torch

from alignlab.representation import merging as M
from alignlab.representation import nets


def _random_params(widths=(12, 9), d_in=5, n_out=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    dims = [d_in, *widths, n_out]
    p = {}
    for i in range(len(dims) - 1):
        p[f"W{i}"] = torch.randn(dims[i + 1], dims[i], generator=g, dtype=torch.float64)
        p[f"b{i}"] = torch.randn(dims[i + 1], generator=g, dtype=torch.float64)
    return p


def _random_perms(p, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(len(p[f"b{i}"]), generator=g) for i in range(M.n_hidden(p))]


def test_params_and_forward_match_the_torch_mlp():
    torch.manual_seed(0)
    model = nets.MLP(64, (16, 8), 10, bn=False).double()
    p = M.mlp_params(model)
    assert sorted(p) == ["W0", "W1", "W2", "b0", "b1", "b2"] and M.n_hidden(p) == 2
    x = torch.randn(7, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(M.forward(p, x), model(x))
    with pytest.raises(ValueError):
        M.mlp_params(nets.MLP(64, (16,), 10, bn=True))


def test_permuted_network_computes_the_same_function_and_differs_in_weights():
    p = _random_params()
    perms = _random_perms(p)
    q = M.permute(p, perms)
    x = torch.randn(20, 5, dtype=torch.float64)
    logits, hidden = M.forward(p, x, return_hidden=True)
    logits_q, hidden_q = M.forward(q, x, return_hidden=True)
    torch.testing.assert_close(logits_q, logits, rtol=0, atol=1e-12)
    for h, hq, perm in zip(hidden, hidden_q, perms):  # unit i of q is unit perm[i] of p
        torch.testing.assert_close(hq, h[:, perm])
    assert M.l2_distance(p, q) > 1.0
    # inverse and compose
    back = M.permute(q, M.inverse(perms))
    assert all(torch.equal(back[k], p[k]) for k in p)
    perms2 = _random_perms(p, seed=5)
    twice = M.permute(M.permute(p, perms), perms2)
    once = M.permute(p, M.compose(perms2, perms))
    assert all(torch.equal(twice[k], once[k]) for k in p)


def test_weight_matching_recovers_a_known_permutation_exactly():
    torch.manual_seed(0)
    model = nets.MLP(64, (32, 24), 10, bn=False)
    p = M.mlp_params(model)
    perms = _random_perms(p, seed=3)
    q = M.permute(p, perms)
    found, info = M.weight_matching(p, q, seed=0)
    aligned = M.permute(q, found)
    assert M.l2_distance(p, aligned) < 1e-12
    for f, perm in zip(found, perms):  # q's unit found[i] is p's unit i
        assert torch.equal(perm[f], torch.arange(len(perm)))
    assert info["objective"][-1] == pytest.approx(M.inner(p, p))
    assert all(b >= a - 1e-9 for a, b in zip(info["objective"], info["objective"][1:]))  # monotone ascent


def test_weight_matching_objective_is_a_local_optimum_against_single_swaps():
    pa, pb = _random_params(seed=0), _random_params(seed=1)
    perms, _ = M.weight_matching(pa, pb, seed=0)
    best = M.inner(pa, M.permute(pb, perms))
    assert best >= M.inner(pa, pb) - 1e-12
    for layer in range(len(perms)):
        for i in range(len(perms[layer])):
            for j in range(i + 1, len(perms[layer])):
                swapped = [q.clone() for q in perms]
                swapped[layer][[i, j]] = swapped[layer][[j, i]]
                assert M.inner(pa, M.permute(pb, swapped)) <= best + 1e-9


def test_single_layer_assignment_matches_brute_force():
    # one hidden layer of 4 units: weight matching must find the global optimum over all 24 permutations
    import itertools

    pa, pb = _random_params(widths=(4,), seed=2), _random_params(widths=(4,), seed=3)
    perms, _ = M.weight_matching(pa, pb)
    brute = max(M.inner(pa, M.permute(pb, [torch.tensor(s)])) for s in itertools.permutations(range(4)))
    assert M.inner(pa, M.permute(pb, perms)) == pytest.approx(brute)


def test_activation_matching_recovers_a_known_permutation():
    p = _random_params(widths=(10, 7), seed=4)
    perms = _random_perms(p, seed=6)
    q = M.permute(p, perms)
    x = torch.randn(500, 5, dtype=torch.float64)
    found = M.activation_matching(p, q, x)
    aligned = M.permute(q, found)
    torch.testing.assert_close(aligned["W1"], p["W1"])
    assert M.l2_distance(p, aligned) < 1e-12


def test_singular_values_are_invariant_under_permutation_in_float64():
    p = _random_params(widths=(30, 20), seed=7)
    q = M.permute(p, _random_perms(p, seed=8))
    for i in range(3):
        sp, sq = M.svd(p[f"W{i}"])[1], M.svd(q[f"W{i}"])[1]
        assert float((sp - sq).abs().max()) < 1e-12
        torch.testing.assert_close(sp, torch.from_numpy(np.linalg.svd(p[f"W{i}"].numpy(), compute_uv=False)))


def test_singular_agreement_and_alignment_ratio():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(20, 15, generator=g, dtype=torch.float64)
    P = torch.eye(20, dtype=torch.float64)[torch.randperm(20, generator=g)]
    assert M.singular_agreement(W, W, k=5) == pytest.approx(1.0)
    assert M.singular_agreement(W, -W, k=5) == pytest.approx(1.0)  # sign-free
    assert M.alignment_ratio(W, W) == pytest.approx(1.0)
    assert M.alignment_ratio(W, -W) == pytest.approx(-1.0)
    # a scaled copy is perfectly aligned; a row-permuted copy has the same sigmas but rotated left vectors
    assert M.alignment_ratio(W, 3 * W) == pytest.approx(1.0)
    assert M.singular_agreement(W, P @ W, k=5) < 0.8
    # the ratio is <W_a, W_b> / sum sigma_a sigma_b, bounded by 1 (von Neumann)
    V = torch.randn(20, 15, generator=g, dtype=torch.float64)
    sa, sv = M.svd(W)[1], M.svd(V)[1]
    assert M.alignment_ratio(W, V) == pytest.approx(float((W * V).sum() / (sa * sv).sum()))
    assert abs(M.alignment_ratio(W, V)) <= 1
    s = M.component_agreement(W, V)
    assert s.shape == (15,) and float(s.min()) >= 0 and float(s.max()) <= 1


def test_truncation_is_the_best_low_rank_approximation():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(12, 8, generator=g, dtype=torch.float64)
    s = M.svd(W)[1]
    for r in [1, 3, 8]:
        err = torch.linalg.matrix_norm(W - M.truncate(W, r))
        assert float(err) == pytest.approx(float(s[r:].square().sum().sqrt()), abs=1e-10)
        assert torch.linalg.matrix_rank(M.truncate(W, r)) == r


def test_barrier_of_a_straight_line_is_zero_and_of_a_bump_is_its_height():
    lams = np.linspace(0, 1, 11)
    assert M.barrier(2 + 3 * lams, lams) == pytest.approx(0.0, abs=1e-12)
    assert M.barrier(1 + 0.5 * np.sin(np.pi * lams), lams) == pytest.approx(0.5)
    acc = 0.9 - 0.2 * np.sin(np.pi * lams)
    assert M.barrier(acc, lams, higher_is_worse=False) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        M.barrier([1, 2], [0.1, 1.0])


def test_path_between_a_model_and_itself_is_flat_and_interpolation_endpoints():
    p = _random_params(seed=9)
    q = M.permute(p, _random_perms(p, seed=10))
    x = torch.randn(50, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (50,))
    lams = np.linspace(0, 1, 5)
    r = M.path(p, p, x, y, lams)
    assert np.ptp(r["loss"]) < 1e-12 and M.barrier(r["loss"], lams) == pytest.approx(0, abs=1e-12)
    mid = M.interpolate(p, q, 0.0)
    assert all(torch.equal(mid[k], p[k]) for k in p)
    assert M.loss_acc(M.interpolate(p, q, 1.0), x, y) == pytest.approx(M.loss_acc(p, x, y))


def test_merge_of_permuted_copies_is_the_original():
    p = _random_params(seed=11)
    copies = [p] + [M.permute(p, _random_perms(p, seed=s)) for s in (12, 13)]
    merged = M.merge(copies, "wm")
    assert M.l2_distance(merged, p) < 1e-10
    naive = M.merge(copies, "naive")
    assert M.l2_distance(naive, p) > 1.0
    x = torch.randn(300, 5, dtype=torch.float64)
    assert M.l2_distance(M.merge(copies, "am", x=x), p) < 1e-10
    with pytest.raises(ValueError):
        M.merge(copies, "ste")
