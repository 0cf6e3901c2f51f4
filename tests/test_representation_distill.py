"""KD and the ND loss of Wang et al. (arXiv 2305.17007): closed forms, the per-sample reference, the training step."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alignlab.representation import distill, features, loops, nets


def test_kd_loss_is_tau_squared_times_a_hand_computed_kl():
    zs, zt = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    tau = 2.0
    ps = np.exp(zs.numpy()[0] / tau) / np.exp(zs.numpy()[0] / tau).sum()
    pt = np.exp(zt.numpy()[0] / tau) / np.exp(zt.numpy()[0] / tau).sum()
    kl = float((pt * np.log(pt / ps)).sum())
    assert distill.kd_loss(zs, zt, tau).item() == pytest.approx(tau ** 2 * kl, rel=1e-5)


def test_kd_loss_matches_torch_kl_div_batchmean_and_vanishes_on_equal_logits():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(7, 10, generator=g) * 3, torch.randn(7, 10, generator=g) * 3
    ref = F.kl_div(F.log_softmax(zs / 4, 1), F.softmax(zt / 4, 1), reduction="batchmean") * 16
    assert torch.allclose(distill.kd_loss(zs, zt, 4.0), ref, atol=1e-5)
    assert distill.kd_loss(zt, zt + 5.0, 4.0).item() == pytest.approx(0.0, abs=1e-6)  # softmax is shift-invariant


def _nd_loop(es, et, centres, y):
    """The per-sample form of the official DirectNormLoss, as a reference."""
    total = 0.0
    for s, t, k in zip(es, et, y):
        c = centres[k] / centres[k].norm()
        total += 1 - torch.dot(s, c) / max(s.norm(), t.norm())
    return total / len(y)


def test_nd_loss_matches_the_per_sample_reference():
    g = torch.Generator().manual_seed(1)
    es, et = torch.randn(9, 5, generator=g), torch.randn(9, 5, generator=g) * 1.5
    centres, y = torch.randn(4, 5, generator=g), torch.randint(0, 4, (9,), generator=g)
    assert torch.allclose(distill.nd_loss(es, et, centres, y), _nd_loop(es, et, centres, y), atol=1e-6)


def test_nd_loss_closed_forms_short_and_long_student_features():
    centres, y = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([0])
    et = torch.tensor([[0.0, 4.0]])                    # teacher norm 4
    # shorter than the teacher, along the class mean: 1 - ||e_s|| / ||e_t|| (the norm term)
    assert distill.nd_loss(torch.tensor([[2.0, 0.0]]), et, centres, y).item() == pytest.approx(0.5)
    # longer than the teacher: 1 - cos, whatever the norm
    e = torch.tensor([[3.0, 3.0]])
    assert distill.nd_loss(e, et, centres, y).item() == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-6)
    assert distill.nd_loss(10 * e, et, centres, y).item() == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-6)
    # opposite direction, short: 1 + ||e_s|| / ||e_t||
    assert distill.nd_loss(torch.tensor([[-1.0, 0.0]]), et, centres, y).item() == pytest.approx(1.25)


def test_nd_gradient_grows_a_short_feature_along_the_class_mean_and_is_norm_free_when_long():
    centres, y, et = torch.tensor([[0.0, 3.0]]), torch.tensor([0]), torch.tensor([[5.0, 0.0]])
    short = torch.tensor([[0.3, 1.0]], requires_grad=True)
    distill.nd_loss(short, et, centres, y).backward()
    assert torch.allclose(short.grad, torch.tensor([[0.0, -1 / 5]]))   # -c_hat / ||e_t||
    long = torch.tensor([[4.0, 6.0]], requires_grad=True)
    distill.nd_loss(long, et, centres, y).backward()
    assert abs((long.grad * long.detach()).sum().item()) < 1e-6       # orthogonal to e_s: no norm change
    with pytest.raises(ValueError):
        distill.nd_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(1, 3), torch.zeros(2, dtype=torch.long))


def test_kd_warmup_ramp():
    assert [distill.kd_warmup(s, 4) for s in [0, 2, 4, 9]] == [0.0, 0.5, 1.0, 1.0]
    assert distill.kd_warmup(0, 0) == 1.0


def test_teacher_class_means_use_eval_mode_and_restore_the_mode():
    torch.manual_seed(0)
    teacher = nets.Conv1DNet(width=4, emb_dim=6).train()
    x, y = torch.randn(30, 40), torch.arange(30) % 3
    c = distill.teacher_class_means(teacher, x, y, 3)
    assert teacher.training
    teacher.eval()
    with torch.no_grad():
        ref = features.class_means(teacher.features(x), y, 3)
    assert torch.allclose(c, ref, atol=1e-6)


def test_distill_loss_combines_the_terms_with_warmup():
    torch.manual_seed(0)
    teacher, student = nets.Conv1DNet(width=4, emb_dim=6).eval(), nets.Conv1DNet(width=2, emb_dim=6)
    x, y = torch.randn(16, 40), torch.arange(16) % 4
    centres = distill.teacher_class_means(teacher, x, y, 4)
    loss = distill.DistillLoss(teacher, centres, a_kd=1.5, a_nd=2.0, tau=3.0, warmup=2)
    student.eval()  # batch norm in eval mode, so the reference and the three calls see the same features
    with torch.no_grad():
        zs, zt = student(x), teacher(x)
        ce = F.cross_entropy(zs, y)
        kd = distill.kd_loss(zs, zt, 3.0)
        nd = distill.nd_loss(student.features(x), teacher.features(x), centres, y)
    assert loss(student, x, y).item() == pytest.approx((ce + 2.0 * nd).item(), rel=1e-5)          # step 0: no KD
    assert loss(student, x, y).item() == pytest.approx((ce + 0.75 * kd + 2.0 * nd).item(), rel=1e-5)
    assert loss(student, x, y).item() == pytest.approx((ce + 1.5 * kd + 2.0 * nd).item(), rel=1e-5)
    assert set(loss.last) == {"ce", "kd", "nd"} and loss.step == 3
    with pytest.raises(ValueError):
        distill.DistillLoss(teacher, None, a_nd=1.0)


def test_embtrans_projects_only_the_nd_embedding():
    torch.manual_seed(0)
    s = nets.Conv1DNet(width=2, emb_dim=6)
    wrapped = distill.EmbTrans(s, teacher_dim=10)
    x = torch.randn(3, 40)
    assert wrapped.embed(x).shape == (3, 10) and torch.equal(wrapped(x), s(x))
    assert isinstance(distill.EmbTrans(s, 6).proj, torch.nn.Identity)


def test_kd_plus_plus_raises_the_student_norm_towards_the_teacher_class_means():
    """A short training run: ND gives longer student features, better aligned with the teacher's class means."""
    g = torch.Generator().manual_seed(0)
    means = torch.randn(3, 40, generator=g)
    y = torch.arange(300) % 3
    x = means[y] + 0.8 * torch.randn(300, 40, generator=g)
    torch.manual_seed(0)
    teacher = nets.Conv1DNet(width=8, emb_dim=16)
    loops.fit_supervised(teacher, x, y, 60, progress=False)
    centres = distill.teacher_class_means(teacher, x, y, 3)
    out = {}
    for a_nd in [0.0, 4.0]:
        torch.manual_seed(1)
        st = nets.Conv1DNet(width=4, emb_dim=16)
        distill.distill(st, teacher, x, y, 80, centres=centres, a_nd=a_nd, warmup=10, progress=False)
        with torch.no_grad():
            f = st.features(x)
        out[a_nd] = (f.norm(dim=1).mean().item(), features.cosine_to_means(f, y, centres).mean().item())
    assert out[4.0][0] > out[0.0][0] and out[4.0][1] > out[0.0][1] + 0.05, out
