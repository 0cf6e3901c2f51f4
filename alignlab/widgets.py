"""Sliders over a drawing function, with a static twin.

`explore(draw, w=(1, 20, 0.5, 8.0))` first calls `draw(**defaults)` and shows that figure as an ordinary
output (what GitHub, nbviewer and CI see), then shows sliders; moving one (on release) redraws below.
Widget output is never stored in the notebook, so the static figure is the one a reader without a kernel
gets. Without ipywidgets, only the static figure is drawn.
"""

from __future__ import annotations

import inspect

import matplotlib.pyplot as plt


def _slider(name, spec):
    import ipywidgets as W

    if isinstance(spec, (list, tuple)) and spec and all(isinstance(s, str) for s in spec):
        return W.Dropdown(options=list(spec), value=spec[0], description=name)
    lo, hi, step, value = spec
    cls = W.IntSlider if all(isinstance(v, int) for v in spec) else W.FloatSlider
    return cls(min=lo, max=hi, step=step, value=value, description=name, continuous_update=False)


def explore(draw, **params):
    """`params`: name=(low, high, step, default) for a slider, or name=[choice, ...] for a drop-down.

    `draw(**values)` must return a matplotlib figure. Returns the widget box (or None without ipywidgets).
    """
    names = inspect.signature(draw).parameters
    unknown = [p for p in params if p not in names]
    if unknown:
        raise ValueError(f"draw() has no parameter(s) {unknown}; it takes {list(names)}")
    defaults = {k: (v[0] if isinstance(v[0], str) else v[3]) for k, v in params.items()}
    from IPython.display import display

    fig = draw(**defaults)  # the static twin
    display(fig)
    plt.close(fig)
    try:
        import ipywidgets as W
    except ImportError:
        return None
    controls = {k: _slider(k, v) for k, v in params.items()}
    out = W.Output()

    def redraw(_=None):
        with out:
            out.clear_output(wait=True)
            f = draw(**{k: c.value for k, c in controls.items()})
            display(f)
            plt.close(f)

    for c in controls.values():
        c.observe(redraw, names="value")
    box = W.VBox([W.HBox(list(controls.values())), out])
    display(box)
    return box
