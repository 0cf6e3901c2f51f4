"""alignlab.plotting (image grids that mark out-of-range pixels, sweeps, signals) and alignlab.widgets."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from alignlab import plotting, widgets  # noqa: E402

RED, BLUE, WHITE = [0.95, 0.25, 0.2], [0.2, 0.45, 0.95], [1.0, 1.0, 1.0]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def drawn_image(ax):
    (img,) = ax.images
    return np.asarray(img.get_array())


def pixel(rgb, i, r, c, h=3, w=3, ncol=2):
    """Canvas position of pixel (r, c) of image i: a 1-pixel white border around every cell."""
    row, col = divmod(i, ncol)
    return rgb[1 + row * (h + 1) + r, 1 + col * (w + 1) + c]


# ----------------------------------------------------------------------------- image_grid

def test_image_grid_marks_out_of_range_pixels():
    x = torch.zeros(3, 1, 3, 3)
    x[0, 0, 0, 0] = 1.5     # too bright -> red
    x[0, 0, 1, 1] = -2.0    # too dark -> blue
    x[1, 0, 2, 2] = 1.03    # above 1 but within tol -> shown as white (clipped), not marked
    x[1, 0, 0, 1] = 0.5     # in range -> grey (0.5 + 1) / 2
    x[2, 0, 0, 0] = -1.0
    fig, ax = plt.subplots()
    assert plotting.image_grid(x, nrow=2, ax=ax, title="samples") is ax
    rgb = drawn_image(ax)
    assert rgb.shape == (2 * 4 + 1, 2 * 4 + 1, 3)
    np.testing.assert_allclose(pixel(rgb, 0, 0, 0), RED)
    np.testing.assert_allclose(pixel(rgb, 0, 1, 1), BLUE)
    np.testing.assert_allclose(pixel(rgb, 1, 2, 2), WHITE)
    np.testing.assert_allclose(pixel(rgb, 1, 0, 1), [0.75] * 3)
    np.testing.assert_allclose(pixel(rgb, 0, 0, 1), [0.5] * 3)   # zero is mid-grey
    np.testing.assert_allclose(pixel(rgb, 2, 0, 0), [0.0] * 3)   # -1 is black
    np.testing.assert_allclose(rgb[0], np.ones((9, 3)))           # borders are white
    np.testing.assert_allclose(pixel(rgb, 3, 1, 1), WHITE)        # the empty 4th cell too
    marked = np.all(np.isclose(rgb, RED), axis=-1) | np.all(np.isclose(rgb, BLUE), axis=-1)
    assert marked.sum() == 2
    assert ax.get_title() == "samples" and list(ax.get_xticks()) == [] and list(ax.get_yticks()) == []


def test_image_grid_without_marks_and_with_a_custom_range():
    x = torch.tensor([[[[2.0, -2.0], [0.0, 0.25]]]])
    fig, ax = plt.subplots()
    rgb = drawn_image(plotting.image_grid(x, nrow=1, ax=ax, mark_out_of_range=False))
    np.testing.assert_allclose(rgb[1, 1], WHITE)            # clipped to 1, not red
    np.testing.assert_allclose(rgb[1, 2], [0.0] * 3)        # clipped to -1, not blue
    fig, ax = plt.subplots()
    rgb = drawn_image(plotting.image_grid(x, nrow=1, ax=ax, low=0.0, high=1.0, tol=0.0))
    np.testing.assert_allclose(rgb[1, 1], RED)
    np.testing.assert_allclose(rgb[1, 2], BLUE)
    np.testing.assert_allclose(rgb[2, 2], [0.25] * 3)
    fig, ax = plt.subplots()
    plt.sca(ax)
    assert plotting.image_grid(x) is ax  # draws on the current axes by default


# ----------------------------------------------------------------------------- sweep_plot

def sweep_frame():
    rows = []
    for method, slope in (("CFG", 1.0), ("APG", 0.5), ("CFG + rescale", 0.25)):
        for w in (1, 3, 5):
            for seed, noise in ((0, -0.1), (1, 0.1)):
                rows.append({"w": w, "sat": slope * w + noise, "method": method, "seed": seed})
    return pd.DataFrame(rows)


def test_sweep_plot_draws_one_line_per_hue_at_the_mean():
    fig, ax = plt.subplots()
    df = sweep_frame()
    plotting.sweep_plot(df, "w", "sat", "method", ax=ax, title="t", ylabel="saturation")
    lines = ax.get_lines()
    assert [ln.get_label() for ln in lines] == ["CFG", "APG", "CFG + rescale"]
    for ln, slope in zip(lines, (1.0, 0.5, 0.25)):
        np.testing.assert_allclose(ln.get_xdata(), [1, 3, 5])
        np.testing.assert_allclose(ln.get_ydata(), [slope * w for w in (1, 3, 5)])  # mean over seeds
    assert [mcolors.to_hex(ln.get_color()).upper() for ln in lines] == [c.upper() for c in plotting.PALETTE[:3]]
    assert len(ax.collections) == 3  # a min-max band per method (the seeds differ)
    assert ax.get_xlabel() == "w" and ax.get_ylabel() == "saturation" and ax.get_title() == "t"
    assert ax.get_yscale() == "linear"


def test_sweep_plot_order_styles_logy_and_no_band():
    df = sweep_frame()
    df = df[df.seed == 0].assign(sat=lambda d: d.sat.abs() + 1)  # one row per point: no band
    fig, ax = plt.subplots()
    plotting.sweep_plot(df, "w", "sat", "method", ax=ax, logy=True, order=["APG", "CFG"],
                        styles={"APG": {"color": "k", "ls": "--"}})
    lines = ax.get_lines()
    assert [ln.get_label() for ln in lines] == ["APG", "CFG"]
    assert lines[0].get_color() == "k" and lines[0].get_linestyle() == "--"
    assert len(ax.collections) == 0 and ax.get_yscale() == "log" and ax.get_ylabel() == "sat"


def test_palette():
    assert len(plotting.PALETTE) == len(set(plotting.PALETTE)) == 8
    assert all(mcolors.is_color_like(c) for c in plotting.PALETTE)


# ----------------------------------------------------------------------------- signal_grid

def test_signal_grid():
    x = torch.arange(3 * 40, dtype=torch.float32).view(3, 40)
    ref = torch.randn(10, 40)
    axes = plotting.signal_grid(x, labels=["a", "b", "c"], ncol=2, ref=ref)
    assert len(axes) == 4
    for i in range(3):
        (ln,) = axes[i].get_lines()
        np.testing.assert_allclose(ln.get_ydata(), x[i].numpy())
        assert axes[i].get_title() == "abc"[i] and len(axes[i].collections) == 1  # the reference band
    assert not axes[3].axison  # the spare panel is switched off
    fig, given = plt.subplots(1, 3)
    out = plotting.signal_grid(x, axes=given)
    assert list(out) == list(given) and all(len(a.collections) == 0 for a in out)


# ----------------------------------------------------------------------------- widgets.explore

def make_draw(calls):
    def draw(w, method, steps=10):
        calls.append({"w": w, "method": method, "steps": steps})
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, w])
        return fig
    return draw


def test_explore_draws_the_static_twin_once_and_returns_widgets(capsys):
    W = pytest.importorskip("ipywidgets")
    calls = []
    box = widgets.explore(make_draw(calls), w=(1, 20, 0.5, 8.0), method=["cfg", "apg"], steps=(1, 50, 1, 10))
    assert calls == [{"w": 8.0, "method": "cfg", "steps": 10}]  # once, with the defaults
    assert isinstance(box, W.VBox)
    controls, out = box.children
    assert isinstance(out, W.Output)
    w, method, steps = controls.children
    assert isinstance(w, W.FloatSlider) and (w.min, w.max, w.step, w.value) == (1, 20, 0.5, 8.0)
    assert not w.continuous_update  # redraw on release only
    assert isinstance(method, W.Dropdown) and list(method.options) == ["cfg", "apg"] and method.value == "cfg"
    assert isinstance(steps, W.IntSlider) and steps.value == 10
    assert plt.get_fignums() == []  # the static figure was closed after display
    w.value = 12.5  # moving a slider redraws with every current value
    assert calls[-1] == {"w": 12.5, "method": "cfg", "steps": 10}
    method.value = "apg"
    assert calls[-1] == {"w": 12.5, "method": "apg", "steps": 10} and len(calls) == 3


def test_explore_rejects_unknown_params():
    calls = []
    with pytest.raises(ValueError, match=r"no parameter\(s\) \['scale'\].*\['w', 'method', 'steps'\]"):
        widgets.explore(make_draw(calls), scale=(1, 2, 1, 1))
    assert calls == []  # nothing drawn


def test_slider_kinds():
    W = pytest.importorskip("ipywidgets")
    assert isinstance(widgets._slider("n", (1, 10, 1, 3)), W.IntSlider)
    assert isinstance(widgets._slider("x", (1, 10, 1, 3.0)), W.FloatSlider)
    d = widgets._slider("m", ["a", "b"])
    assert isinstance(d, W.Dropdown) and d.value == "a" and d.description == "m"


# ----------------------------------------------------------------------------- frontier
def test_frontier_draws_one_series_per_method_and_the_curve():
    pts = pd.DataFrame({"kl": [0.1, 0.2, 0.5, 0.3], "gold": [1.0, 1.5, 2.0, 0.5], "method": ["A", "A", "A", "B"],
                        "b": [0.1, 0.2, 0.3, np.nan]})
    curve = pd.DataFrame({"kl": [0.6, 0.0, 0.3], "gold": [2.5, 0.0, 1.8]})
    fig, ax = plt.subplots()
    plotting.frontier(pts, "kl", "gold", "method", ax=ax, curve=curve, connect=True, annotate="b")
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {"predicted frontier", "A", "B"}
    assert list(lines["predicted frontier"].get_xdata()) == [0.0, 0.3, 0.6]   # sorted by x
    assert lines["A"].get_linestyle() == "-" and lines["B"].get_linestyle() == "None"
    assert lines["A"].get_color() != lines["B"].get_color()
    assert sorted(t.get_text() for t in ax.texts) == ["0.1", "0.2", "0.3"]   # B's NaN gets no label
    plt.close(fig)
