"""alignlab.llm_alignment.outer / evaluation / train: reward model, RLHF, tilted optimum, judges, helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignlab.llm_alignment import evaluation, lm, outer, world as W
from alignlab.llm_alignment import preference


@pytest.fixture(scope="module")
def w():
    return W.ToyWorld()


def test_best_of_n_and_win_rate():
    resp = [[1], [2], [3], [4], [5], [6]]
    assert evaluation.best_of_n(resp, [0.1, 0.5, 0.2, 3.0, 1.0, 1.0], 2) == [[2], [4], [5]]
    assert evaluation.win_rate([1, 2, 3], [0, 2, 4]) == pytest.approx(0.5)


def test_tilted_weights_closed_form():
    r = np.array([0.0, 1.0, 2.0, 5.0, 5.0, 5.0])
    wts = outer.tilted_weights(r, 0.5, 3)
    e = np.exp(r[:3] / 0.5)
    assert np.allclose(wts[:3], e / e.sum()) and np.allclose(wts[3:], 1 / 3)
    st = outer.tilted_stats(wts, 3, r=r)
    kl0 = np.sum(wts[:3] * np.log(3 * wts[:3])) / 2  # second prompt: uniform weights, KL 0
    assert st["kl"] == pytest.approx(kl0) and st["r"] == pytest.approx((np.sum(wts[:3] * r[:3]) + 5) / 2)
    # beta -> 0 is best-of-n with KL log n; beta -> inf is the reference
    assert outer.tilted_stats(outer.tilted_weights(r, 1e-6, 3), 3)["kl"] == pytest.approx(np.log(3) / 2)
    assert outer.tilted_stats(outer.tilted_weights(r, 1e6, 3), 3)["kl"] == pytest.approx(0, abs=1e-5)


def test_features_and_judges(w):
    p = w.sample_prompts(3, harmful_rate=1.0, seed=1)
    k = p.topic[0]
    on = [int(t) for t in w.topic_ids[k][:4]]
    y = [on[0], on[1], int(p.request[0]), on[2], on[3], w.eos_id]
    f = outer.response_features(w, p[[0]], [y])[0].numpy()
    V = w.vocab_size
    assert f[:V].sum() == 5 and f[V:2 * V].sum() == 5 and f[2 * V:3 * V].sum() == 4 and f[-1] == 1
    first, second = outer.split_halves(w, [y])
    assert first[0] == [on[0], on[1], w.eos_id] and second[0] == [int(p.request[0]), on[2], on[3], w.eos_id]
    g = w.gold(p[[0]], [y])[0]
    assert g == pytest.approx(4 + 1 - 1)
    assert outer.judge_scores(w, p[[0]], [y], "weak")[0] == pytest.approx(2)
    assert outer.judge_scores(w, p[[0]], [y], "decomposed")[0] == pytest.approx(2 + 2 + 1 - 1)


def test_reward_model_learns_gold_ranking(w):
    p = w.sample_prompts(600, seed=2)
    ya = w.sample_responses(p, seed=3)
    yb = w.sample_responses(p, seed=4)
    lab = w.label_pairs(p, ya, yb, seed=5)
    rm = outer.fit_reward_model(w, p, ya, yb, lab, steps=200)
    q = w.sample_prompts(300, seed=6)
    y = w.sample_responses(q, seed=7)
    assert np.corrcoef(rm.score(q, y), w.gold(q, y))[0, 1] > 0.8


def test_rlhf_and_dpo_and_rs_move_the_policy(w):
    torch.manual_seed(0)
    ref = lm.frozen_copy(lm.build_tiny_lm(w.vocab_size, n_positions=w.max_len + 4))
    ev = w.sample_prompts(32, seed=8)
    pol = lm.frozen_copy(ref).requires_grad_(True)
    logs = outer.rlhf_reinforce(pol, ref, w, lambda x, y: w.gold(x, y), 3, 0.1, prompts_per_step=4)
    assert len(logs) == 3 and logs[0]["kl"] == pytest.approx(0, abs=1e-4)
    st = evaluation.policy_stats(pol, ref, w, ev, n=2, seed=1)
    assert st["kl"] > 0 and set(st) >= {"gold", "reward", "cost", "kl", "samples"}
    assert evaluation.policy_stats(ref, ref, w, ev, n=1)["kl"] == 0
    pol = lm.frozen_copy(ref).requires_grad_(True)
    p = w.sample_prompts(16, seed=9)
    ya, yb = w.sample_responses(p, seed=10), w.sample_responses(p, seed=11)
    hist = preference.preference_train(pol, ref, {"prompts": p.ids, "chosen": ya, "rejected": yb}, "dpo", steps=5,
                                       beta=0.1, batch=8)["loss"]
    assert hist[0] == pytest.approx(np.log(2), abs=1e-5) and hist[-1] < hist[0]
    pol = lm.frozen_copy(ref).requires_grad_(True)
    d = outer.rejection_sampling_sft(pol, w, lambda x, y: w.gold(x, y), 8, 3, 2, batch=4)
    assert d["rm_calls"] == 24 and len(d["responses"]) == 8


def test_spurious_cue_prompts(w):
    cues = [int(ids[-1]) for ids in w.topic_ids]
    c = outer.spurious_cue_prompts(w, 200, "correlated", cue_only=0.5, seed=3)
    s = outer.spurious_cue_prompts(w, 200, "shifted", cue_only=0.5, seed=3)
    d = outer.spurious_cue_prompts(w, 2000, "decorrelated", seed=3)
    for p in (c, s, d):
        assert all(x[-1] == w.sep_id and x[:4] == p.ids[0][:4] for x in p.ids)
    # correlated: the cue (just before <sep>) names the prompt's topic; shifted: another topic, same base prompt
    assert all(x[-2] == cues[k] for x, k in zip(c.ids, c.topic))
    assert all(x[-2] != cues[k] and w.topic_of[x[-2]] != k for x, k in zip(s.ids, s.topic))
    assert np.array_equal(c.topic, s.topic) and all(a[:-2] == b[:-2] for a, b in zip(c.ids, s.ids))
    # cue_only rows keep no topic word but the cue; the others keep theirs; harmful requests survive
    n_topic_words = np.array([np.sum(w.topic_of[np.array(x[:-2])] >= 0) for x in c.ids])
    assert 0.35 < np.mean(n_topic_words == 0) < 0.65 and set(n_topic_words) <= {0, 2, 3}
    assert all(x[-3] == r for x, r, h in zip(c.ids, c.request, c.harmful) if h)
    # decorrelated: the cue's topic is independent of the prompt's topic (agreement ~ 1/n_topics)
    agree = np.mean([w.topic_of[x[-2]] == k for x, k in zip(d.ids, d.topic)])
    assert abs(agree - 1 / w.config.n_topics) < 0.04
    assert np.allclose(w.gold(c, [[cues[0], w.eos_id]] * 200), w.gold(s, [[cues[0], w.eos_id]] * 200))


def test_rlhf_prompt_fn(w):
    torch.manual_seed(0)
    ref = lm.frozen_copy(lm.build_tiny_lm(w.vocab_size, n_positions=w.max_len + 4))
    pol = lm.frozen_copy(ref).requires_grad_(True)
    seen = []

    def prompt_fn(n, rng):
        seen.append(outer.spurious_cue_prompts(w, n, "correlated", rng=rng))
        return seen[-1]

    logs = outer.rlhf_reinforce(pol, ref, w, lambda x, y: (seen[-1].repeat(2).topic == x.topic) * 1.0, 2, 0.1,
                                prompts_per_step=3, group=2, prompt_fn=prompt_fn)
    assert len(seen) == 2 and len(seen[0]) == 3 and logs[0]["reward"] == 1.0
