"""Figures shared by the notebooks: sample grids that show out-of-range values, and metric sweeps."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

# one colour per method, the same in every notebook (colour-blind-safe Okabe-Ito palette)
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]


def image_grid(x: torch.Tensor, nrow: int = 10, ax=None, title: str | None = None, low: float = -1.0,
               high: float = 1.0, tol: float = 0.05, mark_out_of_range: bool = True):
    """Show (N, 1, H, W) images in a grid, clipped to [low, high] for display. Pixels that left the range
    by more than `tol` (what `metrics.saturation` counts) are tinted red (too bright) or blue (too dark)."""
    x = x.detach().cpu().float()
    n, _, h, w = x.shape
    ncol = nrow
    nr = int(np.ceil(n / ncol))
    canvas = np.full((nr * (h + 1) + 1, ncol * (w + 1) + 1), np.nan)
    for i in range(n):
        r, c = divmod(i, ncol)
        canvas[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + c * (w + 1): 1 + c * (w + 1) + w] = x[i, 0].numpy()
    gray = (np.clip(canvas, low, high) - low) / (high - low)
    rgb = np.stack([gray] * 3, axis=-1)
    if mark_out_of_range:
        over, under = canvas > high + tol, canvas < low - tol
        rgb[over] = [0.95, 0.25, 0.2]
        rgb[under] = [0.2, 0.45, 0.95]
    rgb[np.isnan(canvas)] = 1.0
    ax = ax or plt.gca()
    ax.imshow(rgb, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def sweep_plot(df, x: str, y: str, hue: str, ax=None, title: str | None = None, logy: bool = False,
               ylabel: str | None = None, order=None, styles: dict | None = None):
    """One line per `hue` value of `y` against `x` (mean over repeated rows, with min-max band)."""
    ax = ax or plt.gca()
    order = list(order) if order is not None else list(dict.fromkeys(df[hue]))
    for i, key in enumerate(order):
        d = df[df[hue] == key].groupby(x)[y].agg(["mean", "min", "max"]).reset_index()
        style = {"color": PALETTE[i % len(PALETTE)], "marker": "o", "ms": 4, "lw": 1.8}
        style.update((styles or {}).get(key, {}))
        ax.plot(d[x], d["mean"], label=str(key), **style)
        if (d["max"] > d["min"]).any():
            ax.fill_between(d[x], d["min"], d["max"], color=style["color"], alpha=0.15, lw=0)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel or y)
    if title:
        ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    return ax


def signal_grid(x: torch.Tensor, labels=None, ncol: int = 5, axes=None, color=PALETTE[0], ref=None):
    """Plot 1-D signals (N, L) as small multiples, optionally over a reference band (ref: (M, L))."""
    x = x.detach().cpu().float()
    n = len(x)
    if axes is None:
        _, axes = plt.subplots(int(np.ceil(n / ncol)), ncol, figsize=(2.0 * ncol, 1.3 * np.ceil(n / ncol)),
                               sharex=True, sharey=True, squeeze=False)
    axes = np.asarray(axes).ravel()
    for i, ax in enumerate(axes):
        if i >= n:
            ax.axis("off")
            continue
        if ref is not None:
            r = ref.detach().cpu().float()
            ax.fill_between(range(r.shape[1]), r.min(0).values, r.max(0).values, color="0.85", lw=0)
        ax.plot(x[i].numpy(), color=color, lw=1.2)
        if labels is not None:
            ax.set_title(str(labels[i]), fontsize=8)
        ax.tick_params(labelsize=6)
    return axes


def frontier(points, x: str, y: str, method: str, ax=None, curve=None, curve_label: str = "predicted frontier",
             connect: bool = False, annotate: str | None = None, styles: dict | None = None, title: str | None = None):
    """A trade-off plane: each row of `points` is one trained model at (`x`, `y`), coloured by its `method`
    (palette order of first appearance, markers cycling); `curve` (rows with the same `x`, `y` columns, sorted by
    `x`) is the best achievable frontier drawn in grey. `connect` joins the points of each method in row order
    (a sweep); `annotate` names a column whose value labels each point (NaN: no label)."""
    ax = ax or plt.gca()
    if curve is not None:
        c = curve.sort_values(x)
        ax.plot(c[x], c[y], color="0.55", lw=2, zorder=1, label=curve_label)
    markers = "osD^vP*X"
    for i, (key, d) in enumerate(points.groupby(method, sort=False)):
        style = {"color": PALETTE[i % len(PALETTE)], "marker": markers[i % len(markers)], "ms": 7,
                 "ls": "-" if connect and len(d) > 1 else "none", "lw": 1.5}
        style.update((styles or {}).get(key, {}))
        ax.plot(d[x], d[y], label=str(key), zorder=3, **style)
        if annotate:
            for _, row in d[d[annotate].notna()].iterrows():
                ax.annotate(f"{row[annotate]:.2g}", (row[x], row[y]), textcoords="offset points", xytext=(4, 4),
                            fontsize=7, color=style["color"])
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if title:
        ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return ax
