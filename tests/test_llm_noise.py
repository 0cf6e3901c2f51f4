"""Tests of `alignlab.llm_alignment.noise` (SFT-data corruption, AUROC) and of the CE / PoFT epoch loop in
`alignlab.llm_alignment.train.sft_epochs` and `lm.batched_logps(average=True)`."""

import copy

import numpy as np
import pytest
import torch

from alignlab.llm_alignment import lm, losses, noise
from alignlab.llm_alignment import train as lltrain
from alignlab.llm_alignment.world import ToyWorld


@pytest.fixture(scope="module")
def world():
    return ToyWorld()


@pytest.fixture(scope="module")
def data(world):
    return world.sft_data(200, seed=3)


def test_corrupt_rate_zero_is_identity(world, data):
    x, y = data
    ys, noisy = noise.corrupt_responses(world, x, y, 0.0, seed=0)
    assert not noisy.any() and ys == [list(map(int, r)) for r in y]


@pytest.mark.parametrize("kind", noise.KINDS)
def test_corrupt_kinds(world, data, kind):
    x, y = data
    ys, noisy = noise.corrupt_responses(world, x, y, 0.5, kinds=(kind,), seed=1)
    assert noisy.sum() == 100
    for i in range(len(y)):
        assert ys[i][-1] == world.eos_id and len(ys[i]) <= world.config.max_resp_len + 1
        if not noisy[i]:
            assert ys[i] == list(y[i])
    changed = np.mean([ys[i] != list(y[i]) for i in np.flatnonzero(noisy)])
    assert changed > 0.9
    f_clean = world._features(x, y)
    f_noisy = world._features(x, ys)
    # every corruption lowers the known helpfulness on average
    assert world.reward(x, ys)[noisy].mean() < world.reward(x, y)[noisy].mean() - 0.5
    if kind == "mismatch":  # the answer of another topic: on-topic words only from its rare off-topic word
        assert f_noisy["on"][noisy].mean() < 0.3 and f_clean["on"][noisy].mean() > 3


def test_corrupt_validates(world, data):
    x, y = data
    with pytest.raises(ValueError):
        noise.corrupt_responses(world, x, y, 1.5)
    with pytest.raises(ValueError):
        noise.corrupt_responses(world, x, y, 0.5, kinds=("typo",))


def test_auroc_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    g = np.random.default_rng(0)
    s = np.round(g.normal(size=300), 1)          # with ties
    pos = g.random(300) < 0.4
    s = s + pos
    assert noise.auroc(s, pos) == pytest.approx(metrics.roc_auc_score(pos, s), abs=1e-12)
    assert noise.auroc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert noise.auroc([1, 2, 3, 4], [True, True, False, False]) == 0.0
    with pytest.raises(ValueError):
        noise.auroc([1, 2], [True, True])


def _tiny(world):
    torch.manual_seed(0)
    return lm.build_tiny_lm(world.vocab_size, 1, 2, 16, n_positions=world.max_len + 4)


def test_batched_logps_average_is_length_normalised_logp(world, data):
    x, y = data
    m = _tiny(world)
    s = lm.batched_logps(m, x.ids[:10], y[:10], average=True, batch=3)
    b = lm.make_batch(x.ids[:10], y[:10])
    with torch.no_grad():
        ref = lm.sequence_logps(m, b) / torch.tensor([len(r) for r in y[:10]], dtype=torch.float32)
    torch.testing.assert_close(s, ref)


def test_sft_epochs_poft_gradient_is_tau_weighted_ce(world, data):
    """One PoFT step with SGD equals one step of CE on tau-weighted samples (the paper's gradient identity)."""
    x, y = data
    x, y = x.ids[:8], y[:8]
    m = _tiny(world)
    ra = torch.randn(8, 2) - 3.0
    b = lm.make_batch(x, y)
    r = lm.sequence_logps(m, b, average=True)
    tau = losses.poft_weights(r, ra)
    g1 = torch.autograd.grad(losses.poft_loss(r, ra), list(m.parameters()), retain_graph=True)
    g2 = torch.autograd.grad(-(tau * r).mean(), list(m.parameters()))
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c)


def test_sft_epochs_history_and_learning(world, data):
    x, y = data
    m = _tiny(world)
    before = lm.batched_logps(m, x.ids, y, average=True).mean()
    ra = torch.full((len(y), 2), -1.0)
    calls = []
    hist = lltrain.sft_epochs(copy.deepcopy(m), x.ids, y, epochs=2, loss="ce", lr=3e-3, batch=32,
                              evaluate=lambda mm: calls.append(1) or {"ok": 1.0}, progress=False)
    assert [h["epoch"] for h in hist] == [0, 1, 2] and len(calls) == 3 and all(h["ok"] == 1.0 for h in hist)
    assert np.isnan(hist[0]["loss"]) and np.isnan(hist[1]["tau"]).all()
    m2 = copy.deepcopy(m)
    hist = lltrain.sft_epochs(m2, x.ids, y, epochs=2, loss="poft", aligned=ra, lr=1e-2, batch=32,
                              schedule="cosine", progress=False)
    assert np.isfinite(hist[2]["tau"]).all() and ((hist[2]["tau"] > 0) & (hist[2]["tau"] < 1)).all()
    assert lm.batched_logps(m2, x.ids, y, average=True).mean() > before + 0.2
    with pytest.raises(ValueError):
        lltrain.sft_epochs(m, x.ids, y, epochs=1, loss="poft")
    with pytest.raises(ValueError):
        lltrain.sft_epochs(m, x.ids, y, epochs=1, loss="kl")
    with pytest.raises(ValueError):
        lltrain.sft_epochs(m, x.ids, y, epochs=1, schedule="linear")
