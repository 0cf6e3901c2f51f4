r"""Variance-preserving noise schedules and the conversions between prediction spaces.

Forward process: $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon$. A model predicts one of
- "epsilon":       $\epsilon$
- "v_prediction":  $v = \sqrt{\bar\alpha_t}\,\epsilon - \sqrt{1-\bar\alpha_t}\,x_0$
- "sample":        $x_0$
Guidance rules may be applied in any of these spaces ("eps", "v", "x0"); `convert` moves between them. Noise
levels `ab` may be floats (one level for the batch, what samplers use) or broadcastable tensors.
Timestep selection follows diffusers' DDIMScheduler exactly ("leading", "trailing", "linspace"), which the
tests check, so a schedule here and a diffusers scheduler with the same config walk the same grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

PREDICTIONS = ("epsilon", "v_prediction", "sample")
SPACES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
GUIDANCE_SPACES = ("model", *SPACES)  # "model": whatever the model predicts, no conversion
SPACINGS = ("leading", "trailing", "linspace")


def zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Alg. 1: shift and scale sqrt(alpha_bar) so the last step has SNR exactly 0."""
    ab_sqrt = torch.cumprod(1 - betas, 0).sqrt()
    first, last = ab_sqrt[0].clone(), ab_sqrt[-1].clone()
    ab_sqrt = (ab_sqrt - last) * first / (first - last)
    ab = ab_sqrt**2
    return 1 - torch.cat([ab[:1], ab[1:] / ab[:-1]])


@dataclass
class VPSchedule:
    alphas_cumprod: torch.Tensor          # (T,) float64
    prediction: str = "epsilon"
    steps_offset: int = 0                 # diffusers' steps_offset for "leading" spacing

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; valid: {PREDICTIONS}")
        if self.prediction == "epsilon" and float(self.alphas_cumprod[-1]) == 0.0:
            raise ValueError("zero terminal SNR needs prediction='v_prediction' or 'sample': "
                             "at alpha_bar = 0 an epsilon-prediction says nothing about x0")

    @classmethod
    def make(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, kind: str = "linear",
             zero_snr: bool = False, prediction: str = "epsilon", steps_offset: int = 0) -> "VPSchedule":
        """'linear' (DDPM) or 'scaled_linear' (Stable Diffusion / EzAudio) betas, optionally zero-SNR."""
        if kind == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        elif kind == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
        else:
            raise ValueError(f"unknown beta schedule {kind!r}; valid: 'linear', 'scaled_linear'")
        if zero_snr:
            betas = zero_terminal_snr(betas)
        return cls(torch.cumprod(1 - betas, 0), prediction, steps_offset)

    @property
    def T(self) -> int:
        return len(self.alphas_cumprod)

    def alpha_bar_at(self, t: int) -> float:
        """alpha_bar at one integer timestep as a float (t = -1: 1.0, the clean end of a DDIM grid)."""
        return float(self.alphas_cumprod[t]) if t >= 0 else 1.0

    def alpha_bar(self, t, like: torch.Tensor) -> torch.Tensor:
        """alpha_bar at integer timesteps t (t = -1 means 'before the first step': 1.0), shaped to broadcast."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).long()
        ab = torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], torch.ones((), dtype=torch.float64))
        ab = ab.to(device=like.device, dtype=like.dtype)
        return ab.reshape(ab.shape + (1,) * (like.ndim - ab.ndim)) if ab.ndim else ab

    def add_noise(self, x0, noise, t):
        ab = self.alpha_bar(t, x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def target(self, x0, noise, t):
        """The regression target of this schedule's prediction type."""
        ab = self.alpha_bar(t, x0)
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "v_prediction":
            return ab.sqrt() * noise - (1 - ab).sqrt() * x0
        return x0

    def timesteps(self, steps: int, spacing: str = "leading") -> list[tuple[int, int]]:
        """The (t, t_prev) pairs of a `steps`-step sampler, as diffusers' DDIMScheduler picks them."""
        T = self.T
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be in [1, {T}], got {steps}")
        if spacing == "leading":
            ratio = T // steps
            ts = [i * ratio + self.steps_offset for i in reversed(range(steps))]
            prev = [t - ratio for t in ts]
        elif spacing == "trailing":
            # numpy's own arange/round, as diffusers computes them (float error decides exact .5 ties);
            # np.arange sometimes yields one extra (t = -1) entry there, which is dropped.
            ts = (np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1)[:steps].tolist()
            prev = [t - T // steps for t in ts]
        elif spacing == "linspace":
            ts = np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64).tolist()
            prev = [t - T // steps for t in ts]
        else:
            raise ValueError(f"unknown spacing {spacing!r}; valid: {SPACINGS}")
        return list(zip(ts, prev))


def to_x0_eps(x, pred, ab, prediction: str):
    """(x0, eps) implied by a model output `pred` of type `prediction` at noise level ab."""
    if prediction == "epsilon":
        return (x - (1 - ab) ** 0.5 * pred) / ab ** 0.5, pred
    if prediction == "v_prediction":
        return ab ** 0.5 * x - (1 - ab) ** 0.5 * pred, (1 - ab) ** 0.5 * x + ab ** 0.5 * pred
    if prediction == "sample":
        return pred, (x - ab ** 0.5 * pred) / (1 - ab) ** 0.5
    raise ValueError(f"unknown prediction {prediction!r}; valid: {PREDICTIONS}")


def from_x0_eps(x0, eps, ab, prediction: str):
    if prediction == "epsilon":
        return eps
    if prediction == "v_prediction":
        return ab ** 0.5 * eps - (1 - ab) ** 0.5 * x0
    if prediction == "sample":
        return x0
    raise ValueError(f"unknown prediction {prediction!r}; valid: {PREDICTIONS}")


def convert(x, pred, ab, src: str, dst: str):
    """Re-express a prediction from space `src` to space `dst` ("eps", "v", "x0") at the same x_t."""
    for s in (src, dst):
        if s not in SPACES:
            raise ValueError(f"unknown space {s!r}; valid: {tuple(SPACES)}")
    if src == dst:
        return pred
    x0, eps = to_x0_eps(x, pred, ab, SPACES[src])
    return from_x0_eps(x0, eps, ab, SPACES[dst])
