"""Online test-time adaptation (alignlab.representation.tta): losses against closed forms and independent numpy /
scipy implementations, and the adaptation loop's bookkeeping (what is frozen, what is predicted when)."""
import math

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from alignlab.representation import nets, tta


def _net(seed=0):
    torch.manual_seed(seed)
    net = nets.MLP(6, (16, 8), 3, bn=True)
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        for bn in tta.bn_layers(net):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.3)
    return net.eval()


def test_bn_affine_params_are_exactly_the_bn_weights_and_biases():
    net = _net()
    params = tta.bn_affine_params(net)
    assert len(params) == 4 and all(p.dim() == 1 for p in params)
    ids = {id(p) for p in params}
    expected = {id(m.weight) for m in net.body if isinstance(m, torch.nn.BatchNorm1d)} | \
               {id(m.bias) for m in net.body if isinstance(m, torch.nn.BatchNorm1d)}
    assert ids == expected


def test_configure_freezes_everything_but_the_bn_affine_parameters():
    net = _net()
    tent = tta.configure(net, "tent")
    trainable = [n for n, p in tent.named_parameters() if p.requires_grad]
    assert sorted(trainable) == ["body.2.bias", "body.2.weight", "body.5.bias", "body.5.weight"]
    assert tent.training and all(b.running_mean is None for b in tta.bn_layers(tent))
    assert not any(p.requires_grad for p in tta.configure(net, "bn").parameters())
    src = tta.configure(net, "source")
    assert not src.training and src.body[2].running_mean is not None
    assert net.body[2].running_mean is not None  # the original is untouched
    with pytest.raises(ValueError):
        tta.configure(net, "shot")
    with pytest.raises(ValueError):
        tta.configure(nets.MLP(6, (4,), 3, bn=False), "bn")


def test_entropy_loss_matches_scipy():
    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    p = logits.softmax(1).numpy()
    assert math.isclose(tta.entropy_loss(logits).item(), scipy.stats.entropy(p, axis=1).mean(), rel_tol=1e-5)
    assert tta.entropy_loss(torch.tensor([[100.0, 0.0, 0.0]])).item() < 1e-6


def test_pseudo_label_loss_is_cross_entropy_with_the_argmax():
    logits = torch.randn(9, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    ref = F.cross_entropy(logits, logits.argmax(1))
    assert torch.allclose(tta.pseudo_label_loss(logits), ref)


def test_cafa_loss_closed_form_two_classes():
    stats = {"mean": torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=torch.float64),
             "cov": torch.eye(2, dtype=torch.float64)}
    z = torch.tensor([[0.5, 0.0]])
    # D0 = 0.25, D1 = 2.25: log(0.25 / 2.5) if class 0 is predicted, log(2.25 / 2.5) if class 1 is
    assert math.isclose(tta.cafa_loss(z, torch.tensor([0]), stats).item(), math.log(0.1), rel_tol=1e-6)
    assert math.isclose(tta.cafa_loss(z, torch.tensor([1]), stats).item(), math.log(0.9), rel_tol=1e-6)


@pytest.mark.parametrize("shared", [True, False])
def test_cafa_loss_matches_a_numpy_implementation(shared):
    rng = np.random.default_rng(0)
    c, d, n = 4, 5, 11
    mean = rng.normal(size=(c, d))
    a = rng.normal(size=(d, d)) if shared else rng.normal(size=(c, d, d))
    cov = a @ np.swapaxes(a, -1, -2) + np.eye(d)
    z = rng.normal(size=(n, d))
    pred = rng.integers(0, c, size=n)
    ref = 0.0
    for i in range(n):
        dist = []
        for k in range(c):
            s = cov if shared else cov[k]
            diff = z[i] - mean[k]
            dist.append(diff @ np.linalg.solve(s, diff))
        ref += np.log(dist[pred[i]] / np.sum(dist)) / n
    stats = {"mean": torch.tensor(mean), "cov": torch.tensor(cov)}
    got = tta.cafa_loss(torch.tensor(z, dtype=torch.float32), torch.tensor(pred), stats, eps=0.0)
    assert math.isclose(got.item(), ref, rel_tol=1e-5)


def test_cafa_gradient_pulls_towards_the_predicted_class_and_away_from_the_others():
    stats = {"mean": torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]], dtype=torch.float64),
             "cov": torch.eye(2, dtype=torch.float64)}
    z = torch.tensor([[1.0, 1.0]], requires_grad=True)
    tta.cafa_loss(z, torch.tensor([0]), stats).backward()
    step = -z.grad[0]
    d = tta.features.mahalanobis(z.detach().double(), stats["mean"], stats["cov"])[0]
    moved = tta.features.mahalanobis((z.detach() + 0.01 * step).double(), stats["mean"], stats["cov"])[0]
    assert moved[0] < d[0] and (moved[0] / moved.sum()) < (d[0] / d.sum())


def test_global_alignment_loss_is_zero_on_the_source_moments():
    z = torch.randn(50, 3, generator=torch.Generator().manual_seed(2))
    stats = {"global_mean": z.double().mean(0), "global_cov": torch.cov(z.double().T)}
    assert tta.global_alignment_loss(z, stats).abs().item() < 1e-10
    shifted = tta.global_alignment_loss(z + 1.0, stats).item()
    assert math.isclose(shifted, 3.0, rel_tol=1e-5)  # ||1||^2 over 3 dims; the covariance is unchanged


def test_source_statistics_shapes_and_float64():
    net = _net()
    x = torch.randn(60, 6, generator=torch.Generator().manual_seed(3))
    y = torch.arange(3).repeat(20)
    st = tta.source_statistics(net, x, y, 3, shared=True)
    assert st["mean"].dtype == torch.float64 and st["cov"].shape == (8, 8) and st["global_cov"].shape == (8, 8)
    assert net.training is False
    per_class = tta.source_statistics(net, x, y, 3, shared=False)
    assert per_class["cov"].shape == (3, 8, 8)


def test_run_online_source_and_bn_predictions():
    net = _net()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(50, 6, generator=g), torch.randint(0, 3, (50,), generator=g)
    src = tta.run_online(net, x, y, "source", seed=0)
    with torch.no_grad():
        assert torch.equal(src["pred"], net(x).argmax(1))
        assert math.isclose(src["err"], (net(x).argmax(1) != y).float().mean().item())
    bn = tta.run_online(net, x, y, "bn", batch_size=16, seed=5)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(5))
    ref = torch.empty(50, dtype=torch.long)
    train_net = tta.configure(net, "bn")
    with torch.no_grad():  # batches of 16, 16, 16 and 2 (a last batch of 1 would be merged)
        for a, b in [(0, 16), (16, 32), (32, 48), (48, 50)]:
            idx = order[a:b]
            ref[idx] = train_net(x[idx]).argmax(1)
    assert torch.equal(bn["pred"], ref) and bn["losses"] == []
    assert bn["feats"].shape == (50, 8)


def test_run_online_merges_a_lonely_last_sample():
    net = _net()
    x = torch.randn(33, 6, generator=torch.Generator().manual_seed(6))
    out = tta.run_online(net, x, None, "tent", batch_size=16, seed=0)
    assert len(out["losses"]) == 2 and "err" not in out


def test_tent_and_cafa_adapt_only_the_bn_affine_parameters():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    stats = tta.source_statistics(net, x, y, 3)
    for method in ["tent", "pl", "global", "cafa"]:
        out = tta.run_online(net, x, y, method, stats=stats, batch_size=16, lr=1e-2, return_model=True)
        adapted = out["model"].state_dict()
        assert len(out["losses"]) == 4
        for k, v in before.items():
            if "running" in k or "num_batches" in k:
                continue
            changed = not torch.equal(adapted[k], v)
            is_affine = k in ("body.2.weight", "body.2.bias", "body.5.weight", "body.5.bias")
            assert changed == is_affine, (method, k)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())  # the source model is untouched
    with pytest.raises(ValueError):
        tta.run_online(net, x, y, "cafa")  # needs statistics


def test_tent_lowers_the_entropy_over_the_stream():
    net = _net()
    x = torch.randn(400, 6, generator=torch.Generator().manual_seed(8))
    out = tta.run_online(net, x, None, "tent", batch_size=50, lr=5e-2, shuffle=False)
    assert out["losses"][-1] < out["losses"][0]


def test_distance_summary_closed_form():
    stats = {"mean": torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]], dtype=torch.float64),
             "cov": torch.eye(2, dtype=torch.float64)}
    z = torch.tensor([[1.0, 0.0]])
    s = tta.distance_summary(z, torch.tensor([0]), stats)
    assert math.isclose(s["intra"], 1.0) and math.isclose(s["inter"], (4.0 + 10.0) / 2)
    assert math.isclose(s["ratio"], 7.0)
