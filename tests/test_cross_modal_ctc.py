"""alignlab.cross_modal.ctc: the segment task, CTC collapse/decoding, edit distance, path scores (against torch's
CTC loss by brute-force enumeration), alignment sampling, f_low_latency and the AWP hinge loss."""

import itertools
import random
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F

from alignlab.cross_modal import ctc


def _logp(B, T, C, seed=0):
    return torch.randn(B, T, C, generator=torch.Generator().manual_seed(seed)).mul(2).log_softmax(-1)


# ----------------------------------------------------------------------------- task and model

def test_segment_task_layout():
    d = ctc.segment_task(50, vocab=8, min_len=3, max_len=6, seg_len=(3, 5), gap=(0, 3), dim=16, noise=0.0, seed=3)
    temp = ctc.token_templates(8, 16, 0)
    assert d.x.shape[0] == 50 and d.x.shape[2] == 16
    for i, toks in enumerate(d.transcripts()):
        assert 3 <= len(toks) <= 6 and all(1 <= v <= 8 for v in toks)
        assert all(a != b for a, b in zip(toks, toks[1:]))
        ons = d.onsets[i, : len(toks)].tolist()
        assert all(0 <= o < d.lengths[i] for o in ons) and ons == sorted(ons)
        for v, o in zip(toks, ons):  # noise 0: the onset frame carries exactly the token's template
            assert torch.allclose(d.x[i, o], temp[v])
            assert o == 0 or not torch.allclose(d.x[i, o - 1], temp[v])
        assert d.x[i, d.lengths[i]:].abs().sum() == 0
    same = ctc.segment_task(50, noise=0.5, seed=3)
    assert torch.equal(same.x, ctc.segment_task(50, noise=0.5, seed=3).x)


def test_segment_task_lead():
    d = ctc.segment_task(40, lead=(4, 6), seed=1)
    assert d.onsets[:, 0].min() >= 4 and d.onsets[:, 0].max() <= 6


@pytest.mark.parametrize("kind", ["conv", "gru"])
def test_model_lookahead_is_causal(kind):
    """Changing frames after t + lookahead leaves the outputs at frames <= t unchanged; frame t + lookahead matters."""
    torch.manual_seed(0)
    m = ctc.CausalCTC(lookahead=3, kind=kind)
    x = torch.randn(2, 20, 16)
    y = x.clone()
    y[:, 12:] += torch.randn(2, 8, 16)
    a, b = m(x), m(y)
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6)
    assert not torch.allclose(a[:, 9], b[:, 9], atol=1e-4)
    assert torch.allclose(a.exp().sum(-1), torch.ones(2, 20), atol=1e-5)


def test_bigru_sees_the_future():
    torch.manual_seed(0)
    m = ctc.CausalCTC(kind="bigru")
    x = torch.randn(1, 12, 16)
    y = x.clone()
    y[:, -1] += 1
    assert not torch.allclose(m(x)[:, 0], m(y)[:, 0], atol=1e-5)


# ----------------------------------------------------------------------------- collapse, decoding, edit distance

def test_collapse_and_emissions():
    assert ctc.collapse([0, 3, 3, 0, 3, 5, 5, 0]) == [3, 3, 5]
    assert ctc.emissions([0, 3, 3, 0, 3, 5, 5, 0]) == ([3, 3, 5], [1, 4, 5])
    assert ctc.emissions(torch.tensor([2, 0, 0])) == ([2], [0])


def test_greedy_decode():
    logp = torch.full((1, 6, 4), -10.0)
    for t, v in enumerate([0, 2, 2, 0, 1, 0]):
        logp[0, t, v] = 0.0
    assert ctc.greedy_decode(logp, torch.tensor([6])) == [([2, 1], [1, 4])]
    assert ctc.greedy_decode(logp, torch.tensor([3])) == [([2], [1])]


@lru_cache(maxsize=None)
def _lev(a, b):
    if not a:
        return len(b)
    if not b:
        return len(a)
    return min(_lev(a[1:], b[1:]) + (a[0] != b[0]), _lev(a[1:], b) + 1, _lev(a, b[1:]) + 1)


def test_edit_distance_known_and_brute_force():
    assert ctc.edit_distance(list("kitten"), list("sitting")) == 3
    assert ctc.edit_distance([], [1, 2]) == 2 and ctc.edit_distance([1, 2, 3], []) == 3
    assert ctc.edit_distance([1, 2, 3], [1, 2, 3]) == 0
    rng = random.Random(0)
    for _ in range(200):
        a = tuple(rng.randint(1, 3) for _ in range(rng.randint(0, 6)))
        b = tuple(rng.randint(1, 3) for _ in range(rng.randint(0, 6)))
        d, pairs = ctc.edit_alignment(list(a), list(b))
        assert d == _lev(a, b)
        # the matched pairs are equal tokens, strictly increasing on both sides, and consistent with the distance:
        # an alignment with m matches costs at least max(len) - m
        assert all(a[i] == b[j] for i, j in pairs)
        assert all(i1 < i2 and j1 < j2 for (i1, j1), (i2, j2) in zip(pairs, pairs[1:]))
        assert d >= max(len(a), len(b)) - len(pairs)


def test_evaluate_perfect_model_delay():
    """A model that emits every token exactly at its onset has TER 0 and delay 0."""
    d = ctc.segment_task(20, noise=0.0, seed=0)

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            lp = torch.full((*x.shape[:2], 9), -20.0)
            lp[..., 0] = 0
            for i in range(len(d)):
                for v, o in zip(d.transcripts()[i], d.onsets[i].tolist()):
                    lp[i, o] = -20.0
                    lp[i, o, v] = 0
            return lp.log_softmax(-1)

    r = ctc.evaluate(Oracle(), d)
    assert r["ter"] == 0 and r["delay"] == 0 and len(r["delays"]) == int(d.target_lengths.sum())


# ----------------------------------------------------------------------------- path scores vs torch's CTC

def test_path_scores_sum_to_ctc_likelihood():
    """Summing exp(unnormalised path score) over every path that collapses to the target gives torch's CTC
    likelihood (brute force over all C^T paths)."""
    T, C = 5, 3
    logp = _logp(2, T, C, seed=1)
    lengths = torch.tensor([T, 4])
    targets = [[1, 2], [1, 1]]
    for b in range(2):
        Tb = int(lengths[b])
        paths = torch.tensor([p + (0,) * (T - Tb) for p in itertools.product(range(C), repeat=Tb)])
        keep = torch.tensor([ctc.collapse(p[:Tb]) == targets[b] for p in paths])
        s = ctc.path_scores(logp[b: b + 1], paths[None], lengths[b: b + 1], normalize=False)[0]
        ours = torch.logsumexp(s[keep], 0)
        ref = -F.ctc_loss(logp[b: b + 1].transpose(0, 1), torch.tensor([targets[b]]), lengths[b: b + 1],
                          torch.tensor([2]), blank=0, reduction="sum")
        assert torch.allclose(ours, ref, atol=1e-5)
        # all paths together carry probability one
        assert torch.allclose(torch.logsumexp(s, 0), torch.tensor(0.0), atol=1e-5)


def test_path_scores_normalised_and_masked():
    logp = _logp(2, 6, 4, seed=2)
    lengths = torch.tensor([6, 3])
    paths = torch.randint(0, 4, (2, 3, 6), generator=torch.Generator().manual_seed(0))
    s = ctc.path_scores(logp, paths, lengths)
    for b in range(2):
        for n in range(3):
            Tb = int(lengths[b])
            ref = sum(logp[b, t, paths[b, n, t]] for t in range(Tb)) / Tb
            assert torch.allclose(s[b, n], ref, atol=1e-6)


def test_ctc_loss_wrapper_matches_ctcloss_module():
    d = ctc.segment_task(8, seed=0)
    logp = _logp(8, d.x.shape[1], 9, seed=3)
    ref = torch.nn.CTCLoss(blank=0, zero_infinity=True)(logp.transpose(0, 1), d.targets, d.lengths,
                                                        d.target_lengths)
    assert torch.allclose(ctc.ctc_loss(logp, d), ref)


# ----------------------------------------------------------------------------- sampling

def test_sample_alignments_marginals():
    logp = _logp(2, 4, 3, seed=4)
    lengths = torch.tensor([4, 2])
    paths = ctc.sample_alignments(logp, lengths, 20000, generator=torch.Generator().manual_seed(0))
    assert paths.shape == (2, 20000, 4)
    freq = F.one_hot(paths, 3).float().mean(1)          # (B, T, C)
    assert torch.allclose(freq[0], logp[0].exp(), atol=0.015)
    assert torch.allclose(freq[1, :2], logp[1, :2].exp(), atol=0.015)
    assert (paths[1, :, 2:] == 0).all()                 # padded frames are blank
    hot = ctc.sample_alignments(logp, lengths, 20000, temperature=0.5, generator=torch.Generator().manual_seed(0))
    tempered = (logp[0] / 0.5).softmax(-1)
    assert torch.allclose(F.one_hot(hot, 3).float().mean(1)[0], tempered, atol=0.015)


# ----------------------------------------------------------------------------- f_low_latency

def _shift_reference(path, Tb, r):
    """Delete frame r (a leading blank or a repeat) of the first Tb frames and append a blank at Tb - 1."""
    head = path[:r] + path[r + 1: Tb] + [0]
    return head + path[Tb:]


def test_f_low_latency_against_reference():
    g = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    for _ in range(300):
        T = rng.randint(1, 10)
        Tb = rng.randint(1, T)
        p = [rng.choice([0, 0, 1, 2]) for _ in range(Tb)] + [0] * (T - Tb)
        out = ctc.f_low_latency(torch.tensor(p)[None, None], torch.tensor([Tb]), generator=g)[0, 0].tolist()
        cands = [t for t in range(Tb) if (t == 0 and p[0] == 0) or (t > 0 and p[t] == p[t - 1])]
        if not cands:
            assert out == p
            continue
        assert out in [_shift_reference(p, Tb, r) for r in cands]
        assert ctc.collapse(out[:Tb]) == ctc.collapse(p[:Tb])
        toks, fr = ctc.emissions(p[:Tb])
        toks2, fr2 = ctc.emissions(out[:Tb])
        assert toks2 == toks and all(b in (a, a - 1) for a, b in zip(fr, fr2))


def test_f_low_latency_uniform_choice_and_shift():
    p = torch.tensor([[[0, 0, 3, 3, 0, 5, 0, 0]]]).expand(1, 4000, 8)
    out = ctc.f_low_latency(p, torch.tensor([8]), generator=torch.Generator().manual_seed(0))
    # candidates: t=0 (leading blank), t=1 (blank repeat), t=3 (3 repeat), t=7 (blank repeat)
    outcomes = {tuple(o.tolist()) for o in out[0]}
    assert outcomes == {(0, 3, 3, 0, 5, 0, 0, 0), (0, 0, 3, 0, 5, 0, 0, 0), (0, 0, 3, 3, 0, 5, 0, 0)}
    early = (out[0, :, 1] == 3).float().mean()           # t=0 or t=1 deleted: half of the draws
    assert abs(early.item() - 0.5) < 0.04


# ----------------------------------------------------------------------------- the AWP loss

def test_awp_loss_matches_manual_hinge_and_gradient():
    logp_raw = torch.randn(3, 7, 4, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    lengths = torch.tensor([7, 5, 6])
    logp = logp_raw.log_softmax(-1)
    loss, paths, better = ctc.awp_loss(logp, lengths, n_paths=4, margin=0.0,
                                       generator=torch.Generator().manual_seed(1), return_paths=True)
    s = ctc.path_scores(logp, paths, lengths) - ctc.path_scores(logp, better, lengths)
    assert torch.allclose(loss, s.clamp(min=0).mean())
    loss.backward()
    assert logp_raw.grad.abs().sum() > 0
    # frames beyond each utterance's length get no gradient
    assert logp_raw.grad[1, 5:].abs().sum() == 0


def test_awp_loss_margin_ignores_identical_pairs():
    """All-blank paths are shifted into themselves by f_low_latency, so with a margin the loss must stay 0 (identical
    pairs are ignored), not equal to the margin."""
    logp = torch.full((2, 5, 3), -30.0)
    logp[..., 0] = 0.0
    logp = logp.log_softmax(-1)
    loss = ctc.awp_loss(logp, torch.tensor([5, 4]), n_paths=3, margin=0.3, generator=torch.Generator().manual_seed(0))
    assert loss.item() == 0.0


def test_awp_gradient_moves_emission_earlier():
    """One gradient step on L_AWP raises p(token) one frame before a confident emission and lowers it at the
    emission frame."""
    logits = torch.full((1, 6, 3), -4.0)
    logits[0, :, 0] = 4.0
    logits[0, 3, 0], logits[0, 3, 2] = -4.0, 4.0         # blank blank blank [2] blank blank
    logits.requires_grad_(True)
    torch.manual_seed(0)
    loss = ctc.awp_loss(logits.log_softmax(-1), torch.tensor([6]), n_paths=64,
                        generator=torch.Generator().manual_seed(0))
    loss.backward()
    g = logits.grad[0]
    assert g[2, 2] < 0 and g[3, 2] > 0                    # descent raises token 2 at t=2, lowers it at t=3


def test_train_ctc_smoke():
    d = ctc.segment_task(64, seed=0)
    torch.manual_seed(0)
    m = ctc.CausalCTC()
    losses = ctc.train_ctc(m, d, steps=3, batch=8, alpha=0.5, progress=False)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
