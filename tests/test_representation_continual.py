"""SLCA's pieces: logit normalisation, continual metrics, classifier alignment and the sequence runner."""
import numpy as np
import pytest
import torch

from alignlab.representation import continual, features, loops, nets


def test_task_logit_norm_matches_a_loop_over_tasks():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 6, generator=g)
    sizes = [2, 3, 1]
    out = continual.task_logit_norm(logits, sizes, tau=0.1)
    for i in range(7):
        norms, lo = [], 0
        for s in sizes:
            norms.append(float(np.linalg.norm(logits[i, lo:lo + s].numpy())) + 1e-7)
            lo += s
        np.testing.assert_allclose(out[i].numpy(), logits[i].numpy() / np.mean(norms) / 0.1, rtol=1e-5)
    assert torch.equal(out.argmax(1), logits.argmax(1))
    one = continual.task_logit_norm(logits, [6], tau=1.0)
    torch.testing.assert_close(one.norm(dim=1), torch.ones(7), atol=1e-5, rtol=0)


def test_cl_metrics_by_hand():
    nan = float("nan")
    acc = np.array([[1.0, nan, nan], [0.5, 0.9, nan], [0.2, 0.6, 0.8]])
    m = continual.cl_metrics(acc)
    assert m["last"] == pytest.approx((0.2 + 0.6 + 0.8) / 3)
    assert m["avg_inc"] == pytest.approx((1.0 + 0.7 + m["last"]) / 3)
    assert m["forgetting"] == pytest.approx(((1.0 - 0.2) + (0.9 - 0.6)) / 2)
    weighted = continual.cl_metrics(acc, counts=[1, 1, 2])
    assert weighted["last"] == pytest.approx((0.2 + 0.6 + 1.6) / 4)
    assert continual.cl_metrics(np.array([[0.7]])) == {"last": 0.7, "avg_inc": 0.7, "forgetting": 0.0}


def test_relabel_maps_classes_to_their_position():
    y = torch.tensor([3, 0, 7, 3])
    assert continual.relabel(y, [7, 3, 0]).tolist() == [1, 2, 0, 1]


def _gaussian_stats(n_classes=4, d=8, sep=3.0):
    mean = sep * torch.eye(n_classes, d, dtype=torch.float64)
    cov = 0.3 * torch.eye(d, dtype=torch.float64).expand(n_classes, d, d).clone()
    return {"mean": mean, "cov": cov}


def test_classifier_alignment_removes_a_bias_toward_the_last_task():
    stats = _gaussian_stats()
    head = nets.ExpandingHead(8, 4)
    with torch.no_grad():
        head.weight.copy_(torch.eye(4, 8))
        head.bias.copy_(torch.tensor([0.0, 0.0, 6.0, 6.0]))  # the last task's rows win everywhere
    z, y = features.sample_gaussians(stats, 200, seed=1)
    before = (head(z.float()).argmax(1) == y).float().mean().item()
    continual.classifier_alignment(head, stats, torch.tensor([0, 0, 1, 1]), 1, [2, 2], epochs=5, lr=0.05,
                                   mean_decay=False, seed=0)
    after = (head(z.float()).argmax(1) == y).float().mean().item()
    assert before < 0.6 and after > 0.95


def test_classifier_alignment_without_logit_norm_also_trains():
    stats = _gaussian_stats()
    head = nets.ExpandingHead(8, 4)
    losses = continual.classifier_alignment(head, stats, torch.tensor([0, 0, 1, 1]), 1, [2, 2], epochs=3,
                                            lr=0.05, tau=None, seed=0)
    assert len(losses) == 3 * 4 and losses[-1] < losses[0]


def _blobs(n_per_class, n_classes, seed):
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(n_classes, 64, generator=g)
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    return centres[y] + torch.randn(len(y), 64, generator=g), y


def test_run_sequence_shapes_frozen_backbone_and_untouched_old_rows():
    x, y = _blobs(30, 4, 0)
    xt, yt = _blobs(10, 4, 0)
    torch.manual_seed(0)
    backbone = nets.MLP(64, (32, 16), 4)
    kw = dict(lr_scale=0.0, head_lr=0.01, epochs=5, batch_size=16, ca=False, seed=0)
    torch.manual_seed(1)
    full = continual.run_sequence(backbone, (x, y), (xt, yt), [0, 1, 2, 3], 2, **kw)
    assert full["acc"].shape == (2, 2) and np.isnan(full["acc"][0, 1]) and full["counts"] == [20, 20]
    np.testing.assert_array_equal(full["acc"], full["acc_ca"])
    for p, q in zip(full["model"].backbone.parameters(), backbone.parameters()):
        assert torch.equal(p, q)
    first = y < 2  # the same first task alone: its head rows must not move while task 2 trains
    torch.manual_seed(1)
    alone = continual.run_sequence(backbone, (x[first], y[first]), (xt[yt < 2], yt[yt < 2]), [0, 1], 2, **kw)
    torch.testing.assert_close(full["model"].head.weight[:2], alone["model"].head.weight[:2], rtol=0, atol=0)
    assert full["acc"][0, 0] == alone["acc"][0, 0] > 0.9


def test_run_sequence_with_ca_changes_only_later_rows_of_the_matrix():
    x, y = _blobs(30, 6, 1)
    xt, yt = _blobs(10, 6, 1)
    torch.manual_seed(0)
    backbone = nets.MLP(64, (32, 16), 6)
    torch.manual_seed(2)
    r = continual.run_sequence(backbone, (x, y), (xt, yt), [5, 3, 1, 0, 2, 4], 2, lr_scale=0.01, epochs=5,
                               batch_size=16, ca_epochs=3, ca_samples=64, seed=0)
    assert r["tasks"] == [[5, 3], [1, 0], [2, 4]]
    np.testing.assert_array_equal(r["acc"][0], r["acc_ca"][0])
    assert np.all(np.isfinite(r["acc_ca"][np.tril_indices(3)]))
    assert r["model"].head.n_classes == 6


def test_joint_training_learns_separable_blobs():
    x, y = _blobs(30, 4, 2)
    xt, yt = _blobs(10, 4, 2)
    torch.manual_seed(0)
    assert continual.joint_training(nets.MLP(64, (32, 16), 4), (x, y), (xt, yt), epochs=10) > 0.9


def test_digits_stream_parts_are_disjoint_and_stratified():
    s = continual.digits_stream(seed=1)
    sizes = {k: len(v[1]) for k, v in s.items()}
    assert sum(sizes.values()) == 1797
    for part in s.values():
        assert set(part[1].tolist()) == set(range(10))
    flat = {k: {tuple(r) for r in v[0].flatten(1).tolist()} for k, v in s.items()}
    assert len(flat["train"] & flat["test"]) <= 5  # sklearn digits holds a few duplicate images
    assert torch.equal(continual.digits_stream(seed=2)["pretrain"][1], s["pretrain"][1])


def test_pretrained_backbone_knows_its_classes_only():
    net = continual.pretrained_backbone()
    assert isinstance(net.body[-1], torch.nn.LayerNorm) and net.feature_dim == 128
    x, y = continual.digits_stream()["test"]
    known = y < 5
    assert loops.evaluate(net, x[known], y[known], 5)["acc"] > 0.9
