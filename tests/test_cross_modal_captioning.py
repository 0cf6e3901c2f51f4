"""alignlab.cross_modal.captioning: captions from pixels, misalignment, InfoNCE, bucketing, captioner, decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alignlab.cross_modal import captioning as C


def _img(pixels):
    """An 8x8 image in [-1, 1] with ink 1 at the given (row, col) pixels."""
    x = -torch.ones(1, 1, 8, 8)
    for r, c in pixels:
        x[0, 0, r, c] = 1.0
    return x


def test_raw_attributes_closed_forms():
    right = _img([(7 - i, i) for i in range(8)])  # "/" : top leans right
    left = _img([(i, i) for i in range(8)])  # "\"
    bar = _img([(i, 3) for i in range(2, 6)])  # vertical bar, rows 2..5
    a = C.raw_attributes(torch.cat([right, left, bar]))
    assert a["mass"].tolist() == [8.0, 8.0, 4.0]
    assert a["slant"][0].item() == pytest.approx(1.0) and a["slant"][1].item() == pytest.approx(-1.0)
    assert a["slant"][2].item() == pytest.approx(0.0)
    assert a["box"].tolist() == [64.0, 64.0, 4.0]


def test_captions_tokens_roundtrip_and_render():
    values = torch.tensor([[7, 1, 2, 0], [0, 0, 0, 1]])
    tok = C.to_tokens(values)
    assert torch.equal(C.to_values(tok), values)
    assert C.render(tok) == ["seven thick right small", "zero thin left large"]
    bad = tok.clone()
    bad[0, 1] = C.VOCAB.index("seven")  # a digit word in the thickness slot is not a thickness
    assert C.to_values(bad)[0, 1].item() == -1
    assert len(C.VOCAB) == 3 + 10 + 2 + 3 + 2


def test_attribute_thresholds_balance_training_split():
    from alignlab.data import digits

    x, y = digits("train")
    thr = C.fit_attribute_thresholds(x)
    v = C.attributes(x, y, thr)
    assert torch.equal(v[:, 0], y)
    slant = torch.bincount(v[:, 2], minlength=3).float() / len(v)
    assert (slant - 1 / 3).abs().max() < 0.02  # tertiles
    assert abs(v[:, 1].float().mean().item() - 0.5) < 0.05


def test_misalign_kinds_and_rates():
    g = torch.Generator().manual_seed(0)
    vals = torch.stack([torch.randint(0, 10, (4000,), generator=g), torch.randint(0, 2, (4000,), generator=g),
                        torch.randint(0, 3, (4000,), generator=g), torch.randint(0, 2, (4000,), generator=g)], 1)
    tok = C.to_tokens(vals)
    out, kind = C.misalign(tok, 0.4, swap_share=0.25, seed=1)
    assert abs((kind != 0).float().mean().item() - 0.4) < 0.03
    assert abs((kind == 1).float().mean().item() - 0.1) < 0.02
    assert torch.equal(out[kind == 0], tok[kind == 0])
    w = kind == 2  # only the digit word changed, always to another digit
    assert torch.equal(out[w, 1:], tok[w, 1:]) and (out[w, 0] != tok[w, 0]).all()
    assert (C.to_values(out) >= 0).all()
    conf = C.derangement(10, seed=3)
    assert (conf != torch.arange(10)).all() and sorted(conf.tolist()) == list(range(10))
    out2, kind2 = C.misalign(tok, 0.4, swap_share=0.0, confusion=conf, seed=1)
    w2 = kind2 == 2
    assert (kind2 != 1).all() and torch.equal(C.to_values(out2)[w2, 0], conf[vals[w2, 0]])
    assert torch.equal(C.misalign(tok, 0.0, seed=1)[0], tok)


def test_class_rates_spread_and_mean():
    y = torch.arange(10).repeat(50)
    r = C.class_rates(y, 0.5, 0.4, seed=0)
    per = torch.stack([r[y == d][0] for d in range(10)])
    assert per.mean().item() == pytest.approx(0.5) and torch.allclose(per.sort().values,
                                                                       torch.linspace(0.1, 0.9, 10, dtype=per.dtype))
    _, kind = C.misalign(C.to_tokens(torch.zeros(20000, 4, dtype=torch.long)), torch.full((20000,), 0.9), seed=0)
    assert abs((kind != 0).float().mean().item() - 0.9) < 0.01


def test_info_nce_matches_manual_cross_entropy():
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    b = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    s = (a @ b.T / 0.2).numpy().astype(np.float64)
    row = -np.mean([s[i, i] - np.log(np.exp(s[i]).sum()) for i in range(6)])
    col = -np.mean([s[i, i] - np.log(np.exp(s[:, i]).sum()) for i in range(6)])
    assert C.info_nce(a, b, 0.2).item() == pytest.approx(0.5 * (row + col), rel=1e-5)
    # perfectly separated pairs at a tiny temperature: loss -> 0
    e = torch.eye(4)
    assert C.info_nce(e, e, 0.01).item() < 1e-6


def test_buckets_match_sklearn_kbins_uniform():
    from sklearn.preprocessing import KBinsDiscretizer

    g = torch.Generator().manual_seed(0)
    train = torch.rand(500, generator=g, dtype=torch.float64) * 0.6 - 0.05
    test = torch.rand(300, generator=g, dtype=torch.float64) * 0.8 - 0.15  # also outside the fitted range
    for n_bins in (2, 5, 8):
        est = KBinsDiscretizer(n_bins=n_bins, encode="ordinal", strategy="uniform", subsample=None)
        est.fit(train.numpy().reshape(-1, 1))
        edges = C.fit_buckets(train, n_bins)
        np.testing.assert_allclose(edges.numpy(), est.bin_edges_[0], rtol=0, atol=1e-12)
        want = est.transform(test.numpy().reshape(-1, 1))[:, 0].astype(int)
        assert C.bucketize(test, edges).tolist() == want.tolist()
    edges = C.fit_buckets(torch.tensor([0.0, 1.0]), 4)
    assert C.bucketize(torch.tensor([0.0, 0.25, 0.2499, 1.0, 7.0, -3.0]), edges).tolist() == [0, 1, 0, 3, 3, 0]


def test_top_populated():
    z = torch.tensor([0, 0, 1, 5, 5, 6])
    assert C.top_populated(z, 8) == 6
    assert C.top_populated(z, 8, min_count=2) == 5


def test_scorer_learns_clean_pairs():
    torch.manual_seed(0)
    from alignlab.data import digits

    x, y = digits("train")
    tok = C.captions(x, y, C.fit_attribute_thresholds(x))
    sc = C.DualEncoder()
    C.fit_scorer(sc, x, tok, 150, seed=0, progress=False)
    wrong = tok.clone()
    wrong[:, 0] = C.to_tokens(torch.stack([(y + 1) % 10] + [torch.zeros_like(y)] * 3, 1))[:, 0]
    assert (sc.score(x, tok) > sc.score(x, wrong)).float().mean() > 0.9


def test_captioner_is_causal_and_control_matters():
    torch.manual_seed(0)
    m = C.Captioner(n_control=4).eval()
    x = torch.randn(3, 1, 8, 8)
    inp = torch.tensor([[C.BOS, 5, 14, 16], [C.BOS, 6, 13, 17], [C.BOS, 7, 14, 18]])
    z = torch.tensor([0, 1, 3])
    out = m(x, inp, z)
    assert out.shape == (3, 4, len(C.VOCAB))
    inp2 = inp.clone()
    inp2[:, 3] = 9
    torch.testing.assert_close(m(x, inp2, z)[:, :3], out[:, :3])  # the future does not leak
    assert not torch.allclose(m(x, inp, torch.tensor([2, 2, 2])), out)
    with pytest.raises(ValueError):
        m(x, inp, None)
    assert C.Captioner(n_control=0).n_prefix == 1 and m.n_prefix == 2


class _Scripted(torch.nn.Module):
    """Next token = a fixed function of the position and of the control: a stand-in with known argmax."""

    def forward(self, x, inputs, control=None):
        n, t = inputs.shape
        logits = torch.zeros(n, t, len(C.VOCAB))
        script = [5, 13, 15, 19, C.EOS] + [7] * 10  # after EOS the decoder must write PAD, not 7
        for i in range(t):
            logits[:, i, script[i]] = 1.0
        if control is not None:
            logits[control == 0, 0, 3] = 2.0  # bucket 0 says "zero" first
        return logits


def test_greedy_decode_follows_argmax_and_pads_after_eos():
    m = _Scripted()
    out = C.greedy_decode(m, torch.zeros(2, 1, 8, 8), torch.tensor([0, 1]), max_len=7)
    assert out[1].tolist() == [5, 13, 15, 19, C.EOS, C.PAD, C.PAD]
    assert out[0, 0].item() == 3 and out[0, 1:5].tolist() == [13, 15, 19, C.EOS]
    assert C.greedy_decode(m, torch.zeros(1, 1, 8, 8), 1, max_len=5)[0].tolist() == [5, 13, 15, 19, C.EOS]


def test_field_accuracy_closed_form():
    target = C.to_tokens(torch.tensor([[1, 0, 0, 0], [2, 1, 1, 1], [3, 0, 2, 1], [4, 1, 0, 0]]))
    pred = torch.cat([target, torch.full((4, 1), C.EOS)], 1)
    pred[1, 0] = C.VOCAB.index("nine")  # wrong digit
    pred[2, 2] = C.VOCAB.index("thin")  # a word of the wrong field
    pred[3, 4] = C.PAD  # right fields but no EOS
    acc = C.field_accuracy(pred, target)
    assert acc["digit"] == 0.75 and acc["slant"] == 0.75 and acc["thickness"] == 1.0 and acc["size"] == 1.0
    assert acc["exact"] == 0.25


def test_teacher_forcing_fits_a_tiny_set():
    torch.manual_seed(0)
    x = torch.randn(8, 1, 8, 8)
    tok = C.to_tokens(torch.stack([torch.arange(8), torch.arange(8) % 2, torch.arange(8) % 3,
                                   (torch.arange(8) + 1) % 2], 1))
    m = C.Captioner(n_control=2)
    z = torch.arange(8) % 2
    losses = C.fit_captioner(m, x, tok, z, steps=200, batch_size=8, lr=5e-3, progress=False)
    assert losses[-1] < 0.05
    assert C.field_accuracy(C.greedy_decode(m, x, z), tok)["exact"] == 1.0
