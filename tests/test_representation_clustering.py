"""ClAM's associative-memory clustering (alignlab.representation.clustering) against closed forms and sklearn."""
import numpy as np
import pytest
import torch

from alignlab.representation import clustering as cl


def _data(n=40, d=3, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), 1.5 * torch.randn(k, d, generator=g,
                                                                                   dtype=torch.float64)


def test_energy_matches_definition_and_update_is_minus_gradient():
    x, r = _data()
    beta = 1.7
    d2 = ((x[:, None, :] - r[None]) ** 2).sum(-1)
    e = -torch.log(torch.exp(-beta / 2 * d2).sum(1)) / beta
    assert torch.allclose(cl.am_energy(x, r, beta), e)
    v = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(cl.am_energy(v, r, beta).sum(), v)
    alpha = 0.3
    assert torch.allclose(cl.am_step(x, r, beta, alpha), x - alpha * grad)
    w = torch.softmax(-beta / 2 * d2, 1)
    assert torch.allclose(cl.am_step(x, r, beta, alpha), x + alpha * (w[:, :, None] * (r[None] - x[:, None])).sum(1))


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("beta", [0.2, 2.0, 20.0])
def test_energy_never_increases_with_and_without_mask(alpha, beta):
    x, r = _data(n=200, d=5, k=6)
    mask = cl.random_mask(200, 5, 0.4, torch.Generator().manual_seed(1)).double()
    for m in (None, mask):
        _, path = cl.am_descend(x, r, beta, alpha, steps=25, mask=m, return_path=True)
        e = cl.am_energy(path, r, beta)  # (T+1, n)
        assert (e[1:] <= e[:-1] + 1e-10).all()
        if m is not None:  # visible coordinates never move
            assert torch.equal(path[-1] * (1 - m), x * (1 - m))


def test_overshooting_step_can_increase_energy():
    """The bound needs alpha <= 2: a much larger step overshoots (so the test above can fail)."""
    x, r = _data(n=200, d=2, k=2)
    e0, e1 = cl.am_energy(x, r, 0.5), cl.am_energy(cl.am_step(x, r, 0.5, alpha=4.0), r, 0.5)
    assert (e1 > e0 + 1e-6).any()


def test_large_beta_is_nearest_prototype_assignment():
    x, r = _data(n=300, d=4, k=5)
    w = cl.am_weights(x, r, 1e4)
    nn = ((x[:, None, :] - r[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(w.argmax(1), nn) and torch.allclose(w, torch.nn.functional.one_hot(nn, 5).double(),
                                                           atol=1e-6)
    # alpha = 1, one step lands on the nearest prototype; then ClAM's assignment is exactly nearest(x)
    assert torch.allclose(cl.am_step(x, r, 1e4, alpha=1.0), r[nn], atol=1e-6)
    assert torch.equal(cl.assign(x, r, 1e4, alpha=0.1), nn)
    # soft k-means tends to the Lloyd step
    assert torch.allclose(cl.soft_kmeans_step(x, r, 1e4), cl.lloyd_step(x, r)[0], atol=1e-6)


def test_batched_configs_match_single_runs():
    x, r = _data(n=50, d=3, k=4)
    r2 = torch.stack([r, r + 0.3])
    betas = torch.tensor([0.5, 3.0], dtype=torch.float64)
    vb = cl.am_descend(x.expand(2, *x.shape), r2, betas, 0.1)
    for i in range(2):
        assert torch.allclose(vb[i], cl.am_descend(x, r2[i], betas[i].item(), 0.1))
    lab = cl.assign(x, r2, betas, batch=16)
    assert lab.shape == (2, 50) and torch.equal(lab[1], cl.assign(x, r2[1], 3.0))


def test_lloyd_step_matches_sklearn():
    from sklearn.cluster import KMeans

    x, r = _data(n=120, d=3, k=4)
    new, labels = cl.lloyd_step(x, r)
    km = KMeans(4, init=r.numpy(), n_init=1, max_iter=1, algorithm="lloyd", tol=0).fit(x.numpy())
    assert np.allclose(new.numpy(), km.cluster_centers_, atol=1e-10)
    d2 = ((x[:, None] - r[None]) ** 2).sum(-1)
    assert torch.equal(labels, d2.argmin(1))
    # an empty cluster keeps its center
    far = torch.cat([r[:3], torch.full((1, 3), 100.0, dtype=torch.float64)])
    assert torch.equal(cl.lloyd_step(x, far)[0][3], far[3])


def test_masks_and_fill():
    g = torch.Generator().manual_seed(0)
    m = cl.random_mask(500, 10, 0.2, g)
    assert torch.equal(m.sum(1), torch.full((500,), 2.0)) and (m[:, 0].mean() > 0.1)  # coordinate 0 can hide
    assert len({tuple(row.tolist()) for row in m}) > 10
    s = cl.random_mask(7, 10, 0.2, g, shared=True)
    assert (s == s[0]).all() and s[0].sum() == 2
    assert cl.random_mask(4, 2, 0.2, g).sum(1).eq(1).all()  # at least one coordinate
    x = torch.randn(30, 4)
    assert torch.equal(cl.fill_values(x, "max"), x.max(0).values)
    xm = cl.mask_input(x, m[:30, :4].clone().fill_(0).index_fill_(1, torch.tensor([2]), 1.0), x.min(0).values)
    assert torch.equal(xm[:, 2], x.min(0).values[2].expand(30)) and torch.equal(xm[:, :2], x[:, :2])
    with pytest.raises(ValueError):
        cl.fill_values(x, "median")


def test_clam_fit_learns_separated_clusters():
    g = torch.Generator().manual_seed(3)
    centers = torch.tensor([[4.0, 0, 0, 0], [-4.0, 0, 0, 0], [0, 4.0, 0, 0]])
    y = torch.arange(3).repeat_interleave(60)
    x = centers[y] + 0.5 * torch.randn(180, 4, generator=g)
    x = (x - x.mean(0)) / x.std(0)
    f = cl.clam_fit(x, 3, [1.0, 4.0], epochs=40, batch=32, lr=0.05, fill=["mean", "max"], seed=0)
    assert f.protos.shape == (2, 3, 4) and f.loss.shape == (40, 2)
    assert (f.loss[-5:].mean(0) < f.loss[:3].mean(0)).all()
    labels = cl.assign(x, f.protos, f.beta)
    assert max(cl.ari(y, lab) for lab in labels) > 0.95
    # the unmasked ablation trains too, and the configs do not interact
    f1 = cl.clam_fit(x, 3, [4.0], epochs=5, batch=32, masked=False, seed=0,
                     init=cl.init_prototypes(2, 3, 4, seed=0)[1:])
    f2 = cl.clam_fit(x, 3, [1.0, 4.0], epochs=5, batch=32, masked=False, seed=0)
    assert torch.allclose(f1.protos[0], f2.protos[1], atol=1e-5)


def test_silhouette_counts_one_cluster_as_minus_one():
    from sklearn.metrics import silhouette_score

    x, _ = _data(n=40)
    assert cl.silhouette(x, np.zeros(40)) == -1.0
    lab = (x[:, 0] > 0).long().numpy()
    assert cl.silhouette(x, lab) == pytest.approx(silhouette_score(x.numpy(), lab))
