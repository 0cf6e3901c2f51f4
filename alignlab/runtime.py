"""The run context every notebook opens first: seeds, threads, device, offline guard, figures, claims.

    run = alignlab.start("apg_adaptive_projected_guidance", scale=scale, seed=seed, device=device)
    steps = run.at_scale(quick=1500, paper=20000)          # one knob per scale
    run.knob("guidance_scales", guidance_scales, low=1, high=40)
    ...
    run.save_figure(fig, "saturation_vs_scale", data=df)   # figures/<slug>/saturation_vs_scale.{png,csv}
    run.claim("APG saturates less than CFG at w=15", apg < 0.8 * cfg, apg=apg, cfg=cfg)
    run.finish()                                            # figures/<slug>/run.json

Environment variables: ALIGNLAB_FIGURES (where figures go; default `<repo>/figures`), ALIGNLAB_THREADS
(torch threads; default all cores), ALIGNLAB_CACHE (see `alignlab.cache`).
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import math
import os
import platform
import random
import socket
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from . import __version__

SCALES = ("quick", "paper")
_DEVICE_KINDS = ("auto", "cpu", "cuda", "mps")


class ClaimFailed(AssertionError):
    """A claim of the paper did not hold in this run; the message carries the measured numbers."""


class OfflineError(ConnectionError):
    """Raised by the offline guard when code tries to reach a non-loopback address."""


# ----------------------------------------------------------------------------- paths

def repo_root() -> Path | None:
    """The checkout alignlab is installed from (editable install), or None for a wheel install."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "notebooks").is_dir() and (root / "pyproject.toml").is_file() else None


def figures_root() -> Path:
    env = os.environ.get("ALIGNLAB_FIGURES")
    if env:
        return Path(env)
    root = repo_root()
    return (root / "figures") if root else Path.cwd() / "figures"


# ----------------------------------------------------------------------------- machine set-up

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads: `n`, else ALIGNLAB_THREADS, else every core. Returns the count."""
    if n is None:
        n = int(os.environ.get("ALIGNLAB_THREADS", 0)) or (os.cpu_count() or 1)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    return n


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' means CUDA when present, else CPU. Anything else must name an available device."""
    name = str(device)
    kind = name.split(":")[0]
    if kind not in _DEVICE_KINDS:
        raise ValueError(f"unknown device {name!r}; valid: {', '.join(_DEVICE_KINDS)} (or 'cuda:N')")
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but no CUDA device is visible; use device='auto' or 'cpu'")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device='mps' was asked for but MPS is not available; use device='auto' or 'cpu'")
    return torch.device(name)


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _is_loopback(address) -> bool:
    host = address[0] if isinstance(address, tuple) else address
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: resolve it and judge every address
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return False
        return all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def _guarded(real):
    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
            raise OfflineError(
                f"alignlab runs offline: a connection to {address!r} was blocked. Nothing may be downloaded "
                "at run time; train from shipped or generated data (start(..., offline=False) lifts this)."
            )
        return real(self, address)

    connect.__alignlab_guard__ = True
    return connect


def offline_guard(on: bool = True) -> None:
    """Set the Hugging Face offline variables and refuse non-loopback sockets (or undo both)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        if on:
            os.environ[var] = "1"
        else:
            os.environ.pop(var, None)
    socket.socket.connect = _guarded(_real_connect) if on else _real_connect
    socket.socket.connect_ex = _guarded(_real_connect_ex) if on else _real_connect_ex


def versions() -> dict[str, str]:
    out = {"alignlab": __version__, "python": platform.python_version()}
    for pkg in ("torch", "diffusers", "transformers", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


# ----------------------------------------------------------------------------- the run

def _jsonable(x):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return _jsonable(x.item() if x.numel() == 1 else x.tolist())
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _fmt(v) -> str:
    v = _jsonable(v)
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Run:
    """What one execution of a notebook produced: parameters, figures, claims, duration."""

    def __init__(self, slug: str, scale: str, seed: int, device: torch.device, threads: int):
        self.slug, self.scale, self.seed, self.device, self.threads = slug, scale, seed, device, threads
        self.params: dict = {}
        self.claims: list[dict] = []
        self.figures: list[str] = []
        self.started = time.time()
        self.started_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        sub = Path(slug) if scale == "quick" else Path(slug) / scale
        self.out_dir = figures_root() / sub

    # -- parameters -------------------------------------------------------------
    def at_scale(self, **values):
        """Pick the value for this run's scale: `run.at_scale(quick=1500, paper=20000)`."""
        missing = [s for s in SCALES if s not in values]
        unknown = [s for s in values if s not in SCALES]
        if missing or unknown:
            raise ValueError(f"at_scale needs exactly the scales {SCALES}; missing {missing}, unknown {unknown}")
        return values[self.scale]

    def knob(self, name: str, value, *, low=None, high=None, choices=None):
        """Validate a notebook parameter (a number, or a list of numbers) and record it in run.json."""
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if isinstance(value, (list, tuple)) and not items:
            raise ValueError(f"{name} must not be empty")
        for v in items:
            if choices is not None and v not in choices:
                raise ValueError(f"{name}={v!r} is not valid; valid values: {list(choices)}")
            if low is not None or high is not None:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(f"{name} must be a finite number in [{low}, {high}], got {v!r}")
                if (low is not None and v < low) or (high is not None and v > high):
                    raise ValueError(f"{name}={v!r} is out of range; valid: {low} <= {name} <= {high}")
        self.params[name] = value
        return value

    # -- outputs ----------------------------------------------------------------
    def save_figure(self, fig, name: str, data=None, dpi: int = 110) -> Path:
        """Write figures/<slug>/<name>.png and, if given, the plotted numbers as <name>.csv."""
        if not name or any(c in name for c in "/\\ ") or name.endswith(".png"):
            raise ValueError(f"figure name must be a bare file stem without spaces, got {name!r}")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{name}.png"
        fig.savefig(path, dpi=dpi, bbox_inches="tight", metadata={"Software": None})
        if data is not None:
            data.to_csv(self.out_dir / f"{name}.csv", index=False, float_format="%.6g")
        if name not in self.figures:
            self.figures.append(name)
        return path

    def claim(self, text: str, ok, **measured) -> bool:
        """Record a claim of the paper. A false claim is written to run.json, then raises ClaimFailed."""
        ok = bool(ok)
        self.claims.append({"claim": text, "ok": ok, "measured": _jsonable(measured)})
        numbers = ", ".join(f"{k}={_fmt(v)}" for k, v in measured.items())
        print(f"[{'PASS' if ok else 'FAIL'}] {text}" + (f"  ({numbers})" if numbers else ""))
        if not ok:
            self._write("failed")
            raise ClaimFailed(f"claim failed: {text}; measured {numbers or 'nothing'}")
        return ok

    def finish(self) -> None:
        """Write figures/<slug>/run.json (read it back with `json.load` if needed) and print a summary line."""
        record = self._write("passed")
        print(f"{self.slug}: {len(self.claims)} claims passed, {len(self.figures)} figures, "
              f"{record['duration_s']:.1f} s -> {self.out_dir}")

    def _write(self, status: str) -> dict:
        from .papers import get

        paper = get(self.slug)
        record = {
            "slug": self.slug, "title": paper.title, "family": paper.family, "status": status,
            "scale": self.scale, "seed": self.seed, "device": str(self.device), "threads": self.threads,
            "params": _jsonable(self.params), "versions": versions(), "started_at": self.started_at,
            "duration_s": round(time.time() - self.started, 2), "figures": list(self.figures),
            "claims": self.claims,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir / "run.json.tmp"
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(self.out_dir / "run.json")
        return record


def start(slug: str, scale: str = "quick", seed: int = 0, device: str = "auto", *,
          threads: int | None = None, offline: bool = True) -> Run:
    """Open the run of notebook `slug`: validate, seed, set threads, pick the device, go offline."""
    from .papers import get

    get(slug)  # raises with near matches for an unknown slug
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid scales: {', '.join(SCALES)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    dev = resolve_device(device)
    n = set_threads(threads)
    seed_everything(seed)
    offline_guard(offline)
    try:  # notebooks render inline; scripts and CI render off-screen
        import matplotlib

        if "ipykernel" not in sys.modules:
            matplotlib.use("Agg")
    except ImportError:
        pass
    v = versions()
    print(" | ".join(f"{k} {val}" for k, val in v.items())
          + f" | device {dev} ({n} threads) | scale {scale} | seed {seed}")
    return Run(slug, scale, seed, dev, n)


class Progress:
    """Plain-text progress for long loops (no widget state ends up in notebooks):

        for step in Progress(range(steps), "train denoiser", every=10): ...
    prints about `every` lines with the rate and, via `.note(...)`, the latest loss.
    """

    def __init__(self, iterable, desc: str, every: int = 5, total: int | None = None, enabled: bool = True):
        self.iterable, self.desc, self.enabled = iterable, desc, enabled
        self.total = total if total is not None else len(iterable)
        self.every = max(1, self.total // max(1, every))
        self.extra = ""

    def note(self, **values):
        self.extra = "  " + " ".join(f"{k} {_fmt(v)}" for k, v in values.items())

    def __iter__(self):
        t0 = time.time()
        for i, x in enumerate(self.iterable):
            yield x
            done = i + 1
            if self.enabled and (done % self.every == 0 or done == self.total):
                dt = time.time() - t0
                print(f"{self.desc}: {done}/{self.total}  {done / max(dt, 1e-9):.0f} it/s  {dt:.1f} s{self.extra}",
                      flush=True)


def show_source(*objs) -> None:
    """Display the source of alignlab functions/classes in a notebook (so readers see the real code)."""
    import inspect

    src = "\n\n".join(inspect.getsource(o) for o in objs)
    try:
        from IPython.display import Code, display

        display(Code(src, language="python"))
    except ImportError:
        print(src)
