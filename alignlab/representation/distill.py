"""Knowledge distillation with the ND (norm and direction) loss: Wang et al., "Improving Knowledge Distillation via
Regularizing Feature Norm and Direction" (arXiv 2305.17007, ECCV 2024), official code WangYZ1608/Knowledge-
Distillation-via-ND.

    KD++:  L = CE(z_s, y) + a_kd * w(step) * kd_loss(z_s, z_t, tau) + a_nd * nd_loss(e_s, e_t, centres, y)

with z logits, e penultimate embeddings (the student's projected to the teacher's width when they differ),
`centres` the teacher's class means on the training set and w(step) = min(1, step / warmup) the KD warm-up
(the official scripts ramp the KD term over the first 20 epochs, starting at 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import features, loops


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 4.0) -> torch.Tensor:
    """Hinton KD: tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau)), averaged over the batch.
    The tau^2 factor keeps the gradient scale of the soft term independent of the temperature."""
    log_ps = F.log_softmax(student_logits / tau, dim=1)
    log_pt = F.log_softmax(teacher_logits / tau, dim=1)
    return tau ** 2 * (log_pt.exp() * (log_pt - log_ps)).sum(1).mean()


def nd_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor, centres: torch.Tensor,
            y: torch.Tensor) -> torch.Tensor:
    """The ND loss, (1/B) sum_i [1 - <e_s,i, c_hat_{y_i}> / max(||e_s,i||, ||e_t,i||)], c_hat = c / ||c||.

    While the student's feature is shorter than the teacher's, the denominator is the constant ||e_t,i|| and the
    loss falls linearly as e_s grows along c_hat: it asks for a norm of at least the teacher's. Once longer, the
    loss is 1 - cos(e_s, c_hat) and only the direction is pulled towards the teacher's class mean. Vectorised
    (the official loss loops over samples); `teacher_emb` carries no gradient."""
    if student_emb.shape != teacher_emb.shape:
        raise ValueError(f"student and teacher embeddings differ in shape: {tuple(student_emb.shape)} vs "
                         f"{tuple(teacher_emb.shape)}; project the student (EmbTrans)")
    c_hat = F.normalize(centres, dim=1)[y]
    denom = torch.maximum(student_emb.norm(dim=1), teacher_emb.detach().norm(dim=1))
    return (1 - (student_emb * c_hat).sum(1) / denom).mean()


def kd_warmup(step: int, warmup: int) -> float:
    """KD weight ramp min(1, step / warmup) (0 at the first step, as in the official scripts); 1 if warmup <= 0."""
    return 1.0 if warmup <= 0 else min(1.0, step / warmup)


@torch.no_grad()
def teacher_class_means(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor,
                        n_classes: int | None = None) -> torch.Tensor:
    """(C, d) class means of the teacher's penultimate features on (un-augmented) training data, in eval mode;
    computed once, before the student is trained."""
    was_training = teacher.training
    teacher.eval()
    feats = loops.apply(teacher.features, x)
    teacher.train(was_training)
    return features.class_means(feats.cpu(), y.cpu(), n_classes).to(feats.device)


class EmbTrans(nn.Module):
    """A student with a linear map of its features to the teacher's width, used only by the ND loss.
    `forward` / `features` / `head` are the student's own; `embed(x)` is the projected feature (the student's
    feature itself when `teacher_dim` is None or equal to its width). The official code puts BatchNorm and
    dropout before the linear map; here it is a plain linear layer."""

    def __init__(self, student: nn.Module, teacher_dim: int | None = None):
        super().__init__()
        self.student = student
        d = student.feature_dim
        self.proj = nn.Identity() if teacher_dim in (None, d) else nn.Linear(d, teacher_dim)
        self.feature_dim = d

    @property
    def head(self) -> nn.Module:
        return self.student.head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.student.features(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)


class DistillLoss:
    """The student's training loss as a `loops.fit_supervised` `loss_fn(model, xb, yb)`:

        CE(z_s, y) + a_kd * min(1, step / warmup) * kd_loss(z_s, z_t, tau) + a_nd * nd_loss(e_s, e_t, centres, y)

    a_kd = 0 and a_nd = 0 is plain cross-entropy, a_nd = 0 is KD, both > 0 is KD++ and a_kd = 0 with a_nd > 0 is
    CE + ND. The teacher runs in eval mode without gradients; the step counter advances by one per call and the
    last values of the three terms are kept in `self.last` (for logging)."""

    def __init__(self, teacher: nn.Module, centres: torch.Tensor | None = None, *, a_kd: float = 1.0,
                 a_nd: float = 0.0, tau: float = 4.0, warmup: int = 0):
        if a_nd and centres is None:
            raise ValueError("the ND loss needs the teacher's class means (teacher_class_means)")
        self.teacher = teacher.eval().requires_grad_(False)
        self.centres, self.a_kd, self.a_nd, self.tau, self.warmup = centres, a_kd, a_nd, tau, warmup
        self.step = 0
        self.last: dict[str, float] = {}

    def __call__(self, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            e_t = self.teacher.features(xb)
            z_t = self.teacher.head(e_t)
        feats = model.features(xb)
        z_s = model.head(feats)
        loss = ce = F.cross_entropy(z_s, yb)
        self.last = {"ce": ce.item()}
        if self.a_kd:
            kd = kd_loss(z_s, z_t, self.tau)
            loss = loss + self.a_kd * kd_warmup(self.step, self.warmup) * kd
            self.last["kd"] = kd.item()
        if self.a_nd:
            e_s = model.proj(feats) if hasattr(model, "proj") else feats
            nd = nd_loss(e_s, e_t, self.centres, yb)
            loss = loss + self.a_nd * nd
            self.last["nd"] = nd.item()
        self.step += 1
        return loss


def distill(student: nn.Module, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, *,
            centres: torch.Tensor | None = None, a_kd: float = 1.0, a_nd: float = 0.0, tau: float = 4.0,
            warmup: int = 0, lr: float = 3e-3, batch_size: int = 128, weight_decay: float = 1e-4, augment=None,
            seed: int = 0, desc: str = "distill", progress: bool = True) -> list[float]:
    """Train `student` in place with `DistillLoss` (see there) on (x, y) through `loops.fit_supervised`
    (`augment(xb, generator)` transforms each batch before both networks see it)."""
    loss = DistillLoss(teacher, centres, a_kd=a_kd, a_nd=a_nd, tau=tau, warmup=warmup)
    return loops.fit_supervised(student, x, y, steps, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                                loss_fn=loss, augment=augment, seed=seed, desc=desc, progress=progress)
