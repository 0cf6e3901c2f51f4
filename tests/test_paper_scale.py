"""The paper-scale code paths build and run (a few steps on the CPU; the real runs need a GPU)."""

from __future__ import annotations

import torch

from alignlab import cache, models
from alignlab.guidance import base
from alignlab.guidance.rules import APG, CFG
from alignlab.guidance.samplers import ddim_sample


def test_unet_denoiser_takes_labels_and_the_null_label():
    net = models.UNetDenoiser(sample_size=8, n_classes=10, channels=(16, 32), layers=1, attention=True)
    x = torch.randn(4, 1, 8, 8)
    y = torch.tensor([0, 3, 9, net.null_label])
    out = net(x, torch.tensor([10.0, 500.0, 999.0, 0.0]), y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(net(x, torch.full((4,), 10.0), torch.zeros(4, dtype=torch.long)),
                              net(x, torch.full((4,), 10.0), torch.full((4,), 10)))  # labels matter


def test_digits_denoiser_paper_scale_trains_and_samples(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNLAB_CACHE", str(tmp_path))
    cache.clear_memory()
    net, schedule = base.digits_denoiser("paper", steps=2)
    assert isinstance(net, models.UNetDenoiser) and not net.training
    y = torch.arange(4)
    for rule in (CFG(3.0), APG(3.0, norm_threshold=1.0)):
        out = ddim_sample(net, schedule, y, (1, 8, 8), rule, steps=3)
        assert out.x.shape == (4, 1, 8, 8) and torch.isfinite(out.x).all() and out.nfe == 6
    cache.clear_memory()
