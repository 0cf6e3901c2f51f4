"""`alignlab bench`: timings of the guidance core on this machine, in one run (median of `repeats`).

1. our guided DDIM sampler vs the same loop written with diffusers' `DDIMScheduler.step` (same model, same
   noise; the samples must agree) -- ours should not be slower;
2. cond + uncond in one batched forward vs two separate forwards;
3. APG's overhead over CFG (target <= 10%);
4. the latency of one widget update: 64 digits, 30 DDIM steps, drawn to a PNG (target <= 0.3 s).
"""

from __future__ import annotations

import io
import statistics
import time

import torch

from .guidance import base
from .guidance.rules import APG, CFG
from .guidance.samplers import ddim_sample


def _median_times(fns: dict, repeats: int) -> dict:
    """Median wall time of each function, measured round-robin so that drifts in machine load hit all alike."""
    for fn in fns.values():  # warm-up
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def diffusers_ddim_loop(net, y, x_T, w: float, steps: int):
    """The reference: CFG on the v-prediction with diffusers' DDIMScheduler.step (no clipping, eta = 0)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                          clip_sample=False, set_alpha_to_one=True, prediction_type="v_prediction")
    sched.set_timesteps(steps)
    x, n = x_T.clone(), len(y)
    y2 = torch.cat([y, torch.full_like(y, net.null_label)])
    with torch.no_grad():
        for t in sched.timesteps:
            e = net(torch.cat([x, x]), torch.full((2 * n,), float(t)), y2)
            v = e[n:] + w * (e[:n] - e[n:])
            x = sched.step(v, t, x, eta=0.0).prev_sample
    return x


class _TwoPasses(torch.nn.Module):
    """The same model, but a batched cond+uncond call is split into two forward passes."""

    def __init__(self, net):
        super().__init__()
        self.net, self.null_label = net, net.null_label

    def forward(self, x, t, y):
        n = len(x) // 2
        return torch.cat([self.net(x[:n], t[:n], y[:n]), self.net(x[n:], t[n:], y[n:])])


def main(repeats: int = 5, n: int = 500, steps: int = 30, w: float = 8.0) -> int:
    from .runtime import set_threads

    threads = set_threads()
    net, schedule = base.digits_denoiser("quick")
    y = torch.arange(10).repeat_interleave(n // 10)
    x_T = torch.randn(len(y), 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def ours(rule=None, model=net, yy=y, xT=x_T, k=steps):
        return ddim_sample(model, schedule, yy, (1, 8, 8), rule or CFG(w), steps=k, x_T=xT).x

    diff = (ours() - diffusers_ddim_loop(net, y, x_T, w, steps)).abs().max().item()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plotting import image_grid

    y64, x64 = y[:64], x_T[:64]

    def widget_update():
        x = ours(APG(w, norm_threshold=2.0), yy=y64, xT=x64, k=30)
        fig, ax = plt.subplots(figsize=(4.2, 4.4))
        image_grid(x, nrow=8, ax=ax, title="update")
        fig.savefig(io.BytesIO(), format="png")
        plt.close(fig)

    t = _median_times({
        "ours": ours,
        "diffusers": lambda: diffusers_ddim_loop(net, y, x_T, w, steps),
        "two": lambda: ours(model=_TwoPasses(net)),
        "apg": lambda: ours(APG(w, norm_threshold=2.0, momentum=-0.5)),
        "widget": widget_update,
    }, repeats)
    t_ours, t_diff, t_two, t_apg, t_widget = (t[k] for k in ("ours", "diffusers", "two", "apg", "widget"))

    print(f"alignlab bench: digits MLP denoiser, {n} samples x {steps} DDIM steps, w = {w}, "
          f"{threads} torch threads, median of {repeats}")
    rows = [
        ("ours vs diffusers DDIMScheduler.step loop", f"{t_ours:.3f} s vs {t_diff:.3f} s",
         f"ratio {t_ours / t_diff:.2f} (<= 1 is good); max |diff| of samples {diff:.1e}"),
        ("batched cond+uncond vs two passes", f"{t_ours:.3f} s vs {t_two:.3f} s", f"ratio {t_ours / t_two:.2f}"),
        ("APG overhead over CFG", f"{t_apg:.3f} s vs {t_ours:.3f} s",
         f"overhead {100 * (t_apg / t_ours - 1):+.1f}% (target <= 10%)"),
        ("widget update (64 digits, 30 steps, PNG)", f"{t_widget:.3f} s", "target <= 0.3 s"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, t, note in rows:
        print(f"  {name.ljust(width)}  {t:>22}  {note}")
    return 0
