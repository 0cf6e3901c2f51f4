"""The representation family's shared core: splits, corruptions, heads, loops and class statistics."""
import math

import numpy as np
import pytest
import torch

from alignlab import data
from alignlab.representation import data as rdata, features, loops, nets


def test_tabular_sets_are_standardised():
    for name in rdata.TABULAR:
        x, y = rdata.tabular(name)
        assert len(x) == len(y) and torch.allclose(x.mean(0), torch.zeros(x.shape[1]), atol=1e-4)
    with pytest.raises(ValueError):
        rdata.tabular("mnist")


def test_corruptions_grow_with_severity():
    x, _ = data.digits("test")
    for kind in rdata.CORRUPTIONS:
        assert torch.equal(rdata.corrupt(x, kind, 0), x)
        dist = [(rdata.corrupt(x, kind, s) - x).pow(2).mean().item() for s in range(1, 6)]
        assert all(b > a for a, b in zip(dist, dist[1:])), (kind, dist)
        assert rdata.corrupt(x, kind, 3).shape == x.shape
    with pytest.raises(ValueError):
        rdata.corrupt(x, "fog", 1)
    with pytest.raises(ValueError):
        rdata.corrupt(x, "noise", 6)


def test_blur_and_contrast_keep_the_mean_of_a_constant_image():
    flat = torch.full((2, 1, 8, 8), 0.3)
    assert torch.allclose(rdata.corrupt(flat, "contrast", 5), flat, atol=1e-6)
    blurred = rdata.corrupt(flat, "blur", 3)
    assert torch.allclose(blurred[..., 2:-2, 2:-2], flat[..., 2:-2, 2:-2], atol=1e-6)


def test_small_rotations_keep_the_ink():
    x, _ = data.digits("test")
    r = rdata.corrupt(x, "rotate", 2)
    assert abs((r + 1).sum().item() / (x + 1).sum().item() - 1) < 0.1


def test_class_incremental_partitions_the_samples():
    y = torch.arange(10).repeat(5)
    tasks = rdata.class_incremental(y, 2, order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    assert [c for c, _ in tasks][0] == [9, 8]
    assert sorted(torch.cat([i for _, i in tasks]).tolist()) == list(range(50))
    assert all(set(y[i].tolist()) == set(c) for c, i in tasks)
    with pytest.raises(ValueError):
        rdata.class_incremental(y, [3, 3])


def test_long_tail_counts_follow_the_exponential_profile():
    y = torch.arange(10).repeat(100)
    idx = rdata.long_tail(y, imb_factor=10)
    counts = torch.bincount(y[idx]).tolist()
    assert counts[0] == 100 and counts[-1] == 10
    assert counts == [round(100 * 10 ** (-c / 9)) for c in range(10)]


def test_label_noise_rate_and_kinds():
    y = torch.arange(10).repeat(1000)
    noisy = rdata.label_noise(y, 0.3, seed=1)
    assert abs((noisy != y).float().mean().item() - 0.3) < 0.02
    pair = rdata.label_noise(y, 1.0, kind="pair")
    assert torch.equal(pair, (y + 1) % 10)


def test_dirichlet_clients_partition_and_skew():
    y = torch.arange(10).repeat(100)
    parts = rdata.dirichlet_clients(y, 5, alpha=0.1, seed=0)
    assert sorted(torch.cat(parts).tolist()) == list(range(1000))
    skew = [torch.bincount(y[p], minlength=10).max().item() / len(p) for p in parts]
    even = [torch.bincount(y[p], minlength=10).max().item() / len(p)
            for p in rdata.dirichlet_clients(y, 5, alpha=100.0, seed=0)]
    assert np.mean(skew) > 2 * np.mean(even)


@pytest.mark.parametrize("dim", [9, 10, 32])   # 9 = C - 1: the d-simplex
def test_simplex_etf_geometry(dim):
    w = nets.simplex_etf(10, dim, seed=3)
    assert w.shape == (10, dim)
    gram = w @ w.T
    assert torch.allclose(torch.diagonal(gram), torch.ones(10), atol=1e-5)
    off = gram[~torch.eye(10, dtype=bool)]
    assert torch.allclose(off, torch.full_like(off, -1 / 9), atol=1e-5)
    assert torch.allclose(w.sum(0), torch.zeros(dim), atol=1e-5)   # the vertices are centred
    with pytest.raises(ValueError):
        nets.simplex_etf(10, 8)


def test_pathological_clients_see_few_classes():
    y = torch.arange(10).repeat(60)
    parts = rdata.pathological_clients(y, 10, 2, seed=0)
    assert sorted(torch.cat(parts).tolist()) == list(range(600))
    assert all(len(torch.unique(y[p])) <= 2 for p in parts) and all(len(p) == 60 for p in parts)
    with pytest.raises(ValueError):
        rdata.pathological_clients(y, 400, 2)


def test_expanding_head_keeps_old_rows():
    head = nets.ExpandingHead(4, 2)
    old = head.weight.detach().clone()
    head.add_classes(3)
    assert head.n_classes == 5 and torch.equal(head.weight[:2], old)
    assert head(torch.randn(7, 4)).shape == (7, 5)


def test_fit_evaluate_and_probe_learn_digits():
    x, y = data.digits("train")
    xt, yt = data.digits("test")
    net = nets.MLP(64, (64,), 10, bn=True)
    loops.fit_supervised(net, x, y, 300, seed=0, progress=False)
    ev = loops.evaluate(net, xt, yt)
    assert ev["acc"] > 0.9 and ev["per_class"].shape == (10,)
    assert abs(np.nanmean(ev["per_class"].numpy()) - ev["acc"]) < 0.02
    probe = loops.linear_probe(loops.apply(net.features, x), y)
    assert loops.evaluate(torch.nn.Sequential(net.body, probe), xt, yt)["acc"] > 0.9


def test_parameter_groups_get_their_own_learning_rate():
    net = nets.MLP(8, (8,), 2)
    body0 = [p.detach().clone() for p in net.body.parameters()]
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    loops.fit_supervised(net, x, y, 20, groups=[{"params": net.head.parameters(), "lr": 1e-2}], progress=False)
    assert all(torch.equal(a, b) for a, b in zip(body0, net.body.parameters()))


def test_small_cnn_learns_digits():
    x, y = data.digits("train")
    xt, yt = data.digits("test")
    net = nets.SmallCNN(width=8, emb_dim=32)
    assert net.features(x[:5]).shape == (5, 32)
    loops.fit_supervised(net, x, y, 200, seed=0, progress=False)
    assert loops.evaluate(net, xt, yt)["acc"] > 0.9


def test_conv1d_net_shapes():
    net = nets.Conv1DNet(40, 8, 16, 10)
    assert net(torch.randn(5, 40)).shape == (5, 10) and net.features(torch.randn(5, 40)).shape == (5, 16)


def test_class_gaussians_and_mahalanobis_closed_form():
    g = torch.Generator().manual_seed(0)
    feats = torch.cat([torch.randn(4000, 2, generator=g) * torch.tensor([1.0, 3.0]),
                       torch.randn(4000, 2, generator=g) + 5])
    y = torch.cat([torch.zeros(4000), torch.ones(4000)]).long()
    st = features.class_gaussians(feats, y, shrink=0.0)
    assert torch.allclose(st["mean"], torch.tensor([[0.0, 0.0], [5.0, 5.0]]), atol=0.1)
    assert torch.allclose(torch.diagonal(st["cov"][0]), torch.tensor([1.0, 9.0]), rtol=0.08)
    m = features.mahalanobis(torch.tensor([[0.0, 3.0]]), st["mean"], st["cov"])
    direct = torch.stack([(torch.tensor([0.0, 3.0]) - st["mean"][c]) @ torch.linalg.inv(st["cov"][c])
                          @ (torch.tensor([0.0, 3.0]) - st["mean"][c]) for c in range(2)])
    assert torch.allclose(m[0], direct, rtol=1e-4) and abs(m[0, 0].item() - 1.0) < 0.15
    shared = features.class_gaussians(feats, y, shared=True, shrink=0.0)
    assert shared["cov"].shape == (2, 2)
    xs, ys = features.sample_gaussians(st, 3000, seed=1)
    assert torch.allclose(features.class_means(xs, ys), st["mean"], atol=0.15)


def test_cosine_to_means_is_one_on_the_means():
    means = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert torch.allclose(features.cosine_to_means(means * 3, torch.tensor([0, 1]), means), torch.ones(2))
    assert math.isclose(features.cosine_to_means(torch.tensor([[0.0, 1.0]]), torch.tensor([0]), means).item(), 0.0,
                        abs_tol=1e-6)
