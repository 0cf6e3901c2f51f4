"""The preference-training loop and binary-feedback helpers (alignlab.llm_alignment.preference).

Oracles: `batched_logps` against one `sequence_logps` call; the running-mean delta against the mean of all
rewards the loss saw; direction of learning (a few steps of DPO / BCO / KTO on a random tiny GPT-2 raise the
chosen-minus-rejected log-ratio; SFT raises the desirable log-likelihood); the make-up of `skewed_feedback`.
"""

import copy

import numpy as np
import pytest
import torch

from alignlab.llm_alignment import lm, world as W
from alignlab.llm_alignment import preference as P


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    world = W.ToyWorld()
    ref = lm.build_tiny_lm(world.vocab_size, n_layer=1, n_head=2, d_model=16, n_positions=world.max_len + 4)
    x = world.sample_prompts(64, seed=1)
    ya = world.sample_responses(x, helpfulness=1.0, seed=2)
    yb = world.sample_responses(x, helpfulness=0.0, seed=3)
    return world, ref.requires_grad_(False), x, ya, yb


def margin(model, ref, x, ya, yb):
    d = lm.batched_logps(model, x.ids, ya) - lm.batched_logps(ref, x.ids, ya)
    return (d - (lm.batched_logps(model, x.ids, yb) - lm.batched_logps(ref, x.ids, yb))).mean().item()


def test_batched_logps_matches_one_batch(setup):
    world, ref, x, ya, _ = setup
    full = lm.sequence_logps(ref, lm.make_batch(x.ids, ya))
    assert torch.allclose(lm.batched_logps(ref, x.ids, ya, batch=7), full, atol=1e-5)


def test_paired_to_unpaired():
    d = P.paired_to_unpaired({"prompts": [[1], [2]], "chosen": [[5], [6]], "rejected": [[7], [8]]})
    assert d["prompts"] == [[1], [2], [1], [2]] and d["responses"] == [[5], [6], [7], [8]]
    assert d["desirable"].tolist() == [True, True, False, False]


@pytest.mark.parametrize("method", ["dpo", "ipo", "bco", "bco_shift", "bco_udm", "kto"])
def test_preference_methods_raise_the_margin(setup, method):
    world, ref, x, ya, yb = setup
    paired = {"prompts": x.ids, "chosen": ya, "rejected": yb}
    data = paired if method in P.PAIRED else {**P.paired_to_unpaired(paired), "weight": np.full(128, 2.0)}
    pol = copy.deepcopy(ref)
    h = P.preference_train(pol, ref, data, method, steps=15, batch=32, lr=3e-3, beta=0.5, seed=0)
    assert np.isfinite(h["loss"]).all()
    assert margin(pol, ref, x, ya, yb) > 0.5
    if method in ("bco_shift", "bco_udm"):
        assert h["running_mean"]["count"] == 15 * 32
        rewards_seen = h["delta"][-1]  # the mean of every reward seen, including the last batch
        assert h["running_mean"]["mean"] == pytest.approx(rewards_seen)
    if method == "bco":
        assert set(h["delta"]) == {0.0}
    if method in P.PAIRED:  # the first step starts at the reference: DPO's loss is log 2, IPO's 1/(2 beta)^2
        assert h["loss"][0] == pytest.approx(np.log(2) if method == "dpo" else 1.0, abs=1e-5)


def test_precomputed_reference_logps_give_the_same_run(setup):
    world, ref, x, ya, yb = setup
    paired = {"prompts": x.ids, "chosen": ya, "rejected": yb}
    given = {**paired, "ref_chosen": lm.batched_logps(ref, x.ids, ya), "ref_rejected": lm.batched_logps(ref, x.ids, yb)}
    runs = []
    for data in (paired, given):
        pol = copy.deepcopy(ref)
        runs.append(P.preference_train(pol, ref, data, "dpo", steps=3, batch=16, lr=3e-3, seed=4)["loss"])
    assert runs[0] == pytest.approx(runs[1], abs=1e-6)


def test_sft_raises_desirable_likelihood(setup):
    world, ref, x, ya, yb = setup
    pol = copy.deepcopy(ref)
    data = P.paired_to_unpaired({"prompts": x.ids, "chosen": ya, "rejected": yb})
    h = P.preference_train(pol, ref, data, "sft", steps=15, batch=32, lr=3e-3)
    assert len(h["loss"]) == 15
    gain = (lm.batched_logps(pol, x.ids, ya) - lm.batched_logps(ref, x.ids, ya)).mean().item()
    assert gain > 1.0


def test_wrong_data_or_method_raises(setup):
    world, ref, x, ya, yb = setup
    paired = {"prompts": x.ids, "chosen": ya, "rejected": yb}
    with pytest.raises(ValueError):
        P.preference_train(copy.deepcopy(ref), ref, paired, "bco", steps=1)
    with pytest.raises(ValueError):
        P.preference_train(copy.deepcopy(ref), ref, P.paired_to_unpaired(paired), "dpo", steps=1)
    with pytest.raises(ValueError):
        P.preference_train(copy.deepcopy(ref), ref, paired, "ppo", steps=1)


def test_skewed_feedback_shares():
    g = np.random.default_rng(0)
    group, des = g.random(4000) < 0.5, g.random(4000) < 0.5
    idx, d = P.skewed_feedback(group, des, 500, 0.9, seed=1)
    assert len(set(idx)) == 1000 and d.sum() == 500
    assert group[idx][d].mean() == pytest.approx(0.9) and (~group[idx][~d]).mean() == pytest.approx(0.9)
    with pytest.raises(ValueError):
        P.skewed_feedback(group, des, 1900, 0.9)


def test_win_rate_and_embeddings(setup):
    from alignlab.llm_alignment.evaluation import win_rate

    assert win_rate([1, 2, 3], [0, 2, 4]) == pytest.approx(0.5)
    world, ref, x, _, _ = setup
    e = P.prompt_embeddings(ref, x.ids, batch=5)
    assert e.shape == (64, 16)
    one = P.prompt_embeddings(ref, x.ids[:1])  # padding does not change a prompt's embedding
    assert torch.allclose(e[:1], one, atol=1e-5)
