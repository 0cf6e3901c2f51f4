r"""Guidance rules: pure tensor functions, plus small per-run rule objects the samplers call.

Weight conventions (the one trap every guidance paper sets):
- "uncond" form (Imagen, Stable Diffusion, diffusers' native `guidance_scale`):  $u + w\,(c - u)$;
  w = 1 is plain conditional sampling, w = 0 unconditional.
- "cond" form (Ho & Salimans 2022):  $c + w\,(c - u)$; the same rule with w_uncond = w_cond + 1.
Every function here takes w in the "uncond" form unless its docstring says otherwise.

Functions act per sample: norms, stds and projections are over all non-batch dims.
"""

from __future__ import annotations

import math

import torch

from .schedules import GUIDANCE_SPACES

FORMULATIONS = ("uncond", "cond")


def _dims(x: torch.Tensor) -> list[int]:
    return list(range(1, x.ndim))


def cfg(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, w: float, formulation: str = "uncond") -> torch.Tensor:
    r"""Classifier-free guidance. "uncond": $u + w(c-u)$; "cond": $c + w(c-u)$."""
    if formulation == "uncond":
        return pred_uncond + w * (pred_cond - pred_uncond)
    if formulation == "cond":
        return pred_cond + w * (pred_cond - pred_uncond)
    raise ValueError(f"unknown formulation {formulation!r}; valid: {FORMULATIONS}")


def cfg_rescale(pred_guided: torch.Tensor, pred_cond: torch.Tensor, phi: float) -> torch.Tensor:
    r"""Lin et al. 2023 (Sec. 3.4), used by EzAudio: rescale the guided prediction to the conditional one's std,
    then blend: $\phi \cdot g\,\sigma(c)/\sigma(g) + (1-\phi)\, g$. phi = 0 is a no-op."""
    if not 0.0 <= phi <= 1.0:
        raise ValueError(f"phi must be in [0, 1], got {phi}")
    ratio = pred_cond.std(dim=_dims(pred_cond), keepdim=True) / pred_guided.std(dim=_dims(pred_guided), keepdim=True)
    return phi * (pred_guided * ratio) + (1 - phi) * pred_guided


class MomentumBuffer:
    r"""APG's running average of the guidance update: $m \leftarrow \Delta + \beta m$ (beta < 0: reverse
    momentum). Make a fresh one for every sampling run."""

    def __init__(self, beta: float):
        self.beta = beta
        self.running: torch.Tensor | float = 0.0

    def update(self, delta: torch.Tensor) -> torch.Tensor:
        self.running = delta + self.beta * self.running
        return self.running


def project(v: torch.Tensor, onto: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(parallel, orthogonal) parts of `v` with respect to `onto`, per sample, computed in float64."""
    v64, u64 = v.double(), onto.double()
    unit = torch.nn.functional.normalize(u64.flatten(1), dim=1).view_as(u64)
    par = (v64 * unit).sum(dim=_dims(v64), keepdim=True) * unit
    return par.to(v.dtype), (v64 - par).to(v.dtype)


def apg(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, w: float, eta: float = 0.0,
        norm_threshold: float = math.inf, momentum: MomentumBuffer | None = None) -> torch.Tensor:
    r"""Adaptive projected guidance (Sadat et al., ICLR 2025), on denoised (x0) predictions:

    $\Delta = D_c - D_u$;  $\Delta \leftarrow m$ with momentum;  $\Delta \leftarrow \Delta \min(1, r/\|\Delta\|)$;
    $\Delta_\parallel$ = projection on $D_c$;  result $D_c + (w-1)(\Delta_\perp + \eta\,\Delta_\parallel)$.

    With eta = 1, r = inf and no momentum this is exactly CFG $u + w(c-u)$.
    """
    delta = pred_cond - pred_uncond
    if momentum is not None:
        delta = momentum.update(delta)
    if math.isfinite(norm_threshold):
        if norm_threshold <= 0:
            raise ValueError(f"norm_threshold must be > 0 (inf disables it), got {norm_threshold}")
        norm = delta.flatten(1).norm(dim=1).view(-1, *[1] * (delta.ndim - 1))
        delta = delta * torch.clamp(norm_threshold / norm, max=1.0)
    par, orth = project(delta, pred_cond)
    return pred_cond + (w - 1) * (orth + eta * par)


# ----------------------------------------------------------------------------- rule objects for samplers

class Rule:
    """A guidance rule as a sampler uses it: `space` says which prediction space it acts in ("model" for
    the model's own output, or "eps", "x0", "v"), `needs_uncond` whether the unconditional branch must be evaluated, `reset()` starts a new
    sampling run (clearing per-run state such as APG's momentum), `__call__(cond, uncond)` combines."""

    space = "model"
    needs_uncond = True

    def reset(self) -> None:
        pass

    def __call__(self, cond: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


def _check_space(space: str) -> str:
    if space not in GUIDANCE_SPACES:
        raise ValueError(f"unknown guidance space {space!r}; valid: {GUIDANCE_SPACES}")
    return space


def _check_w(w: float) -> float:
    if not isinstance(w, (int, float)) or not math.isfinite(w):
        raise ValueError(f"guidance scale must be a finite number, got {w!r}")
    return float(w)


class CFG(Rule):
    """CFG, u + w(c - u), optionally followed by Lin et al.'s std rescale with blend `rescale` (phi).

    CFG is affine, so its result does not depend on the space; the rescale does (Lin et al. rescale the model
    output, v for their models)."""

    def __init__(self, w: float, rescale: float = 0.0, space: str = "model"):
        self.w, self.rescale, self.space = _check_w(w), rescale, _check_space(space)
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"rescale (phi) must be in [0, 1], got {rescale}")
        self.needs_uncond = self.w != 1.0

    def __call__(self, cond, uncond):
        if not self.needs_uncond:
            return cond
        out = cfg(cond, uncond, self.w)
        return cfg_rescale(out, cond, self.rescale) if self.rescale > 0 else out

    def __repr__(self):
        return f"CFG(w={self.w:g}" + (f", rescale={self.rescale:g}" if self.rescale else "") + f", space={self.space!r})"


class APG(Rule):
    """APG with its momentum buffer made fresh at every `reset()`. Acts on x0 predictions by default."""

    def __init__(self, w: float, eta: float = 0.0, norm_threshold: float = math.inf, momentum: float = -0.5,
                 space: str = "x0"):
        self.w, self.eta, self.norm_threshold, self.beta = _check_w(w), eta, norm_threshold, momentum
        self.space = _check_space(space)
        if not (math.isinf(norm_threshold) or norm_threshold > 0):
            raise ValueError(f"norm_threshold must be > 0 or inf, got {norm_threshold}")
        self.buffer: MomentumBuffer | None = None
        self.needs_uncond = self.w != 1.0  # w = 1 leaves D_c unchanged: no need for the uncond branch

    def reset(self):
        self.buffer = MomentumBuffer(self.beta) if self.beta != 0 else None

    def __call__(self, cond, uncond):
        if not self.needs_uncond:
            return cond
        return apg(cond, uncond, self.w, self.eta, self.norm_threshold, self.buffer)

    def __repr__(self):
        return (f"APG(w={self.w:g}, eta={self.eta:g}, r={self.norm_threshold:g}, momentum={self.beta:g}, "
                f"space={self.space!r})")
