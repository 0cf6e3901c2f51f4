"""A disk cache for trained artifacts that several notebooks share (base denoisers, evaluators, ...).

    state = cache.load_or_build("digits_denoiser", config, build=train_fn, code=(alignlab.models,))

- The key is the name, the config (JSON) and the code version: alignlab's version plus a hash of the
  source of every object in `code` (the training function, the model module), so editing them retrains.
- Writes are atomic (temporary file + rename), and a file lock makes a second process (two notebooks
  running in parallel under pytest-xdist) wait for the first instead of training the same model again.
- A corrupt or partial file is rebuilt with a warning, never a crash. Loads use `weights_only=True`.
- A build runs on its own seeded random stream (`seed`, else one derived from the key) and leaves the caller's
  global RNG untouched, so what a notebook draws next is the same on a cache hit and on a miss.
- The location is ALIGNLAB_CACHE, else ~/.cache/alignlab.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from filelock import FileLock

from . import __version__

_memory: dict[str, Any] = {}


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNLAB_CACHE", Path.home() / ".cache" / "alignlab"))


def code_version(*objs) -> str:
    """alignlab's version plus a short hash of the source code of `objs` (modules, functions, classes)."""
    h = hashlib.sha256(__version__.encode())
    for obj in objs:
        h.update(inspect.getsource(obj).encode())
    return h.hexdigest()[:12]


def key(name: str, config: dict, code=()) -> str:
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"cache names are letters, digits, '_' and '-', got {name!r}")
    blob = json.dumps(config, sort_keys=True, default=str) + code_version(*code)
    return f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def path_for(name: str, config: dict, code=()) -> Path:
    return cache_dir() / f"{key(name, config, code)}.pt"


def _load(path: Path, map_location):
    return torch.load(path, map_location=map_location, weights_only=True)


def _seeded(seed: int, fn: Callable[[], Any]) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def load_or_build(name: str, config: dict, build: Callable[[], Any], *, code=(), map_location="cpu",
                  seed: int | None = None) -> Any:
    """Return the cached artifact for (name, config, code), building and storing it on a miss.

    `build()` must return something `torch.load(weights_only=True)` can read back: tensors, state dicts,
    lists, dicts, numbers and strings.
    """
    path = path_for(name, config, code)
    if path.stem in _memory:
        return _memory[path.stem]
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        obj = None
        if path.exists():
            try:
                obj = _load(path, map_location)
            except Exception as err:  # corrupt, truncated, or from an incompatible torch
                warnings.warn(f"alignlab.cache: {path.name} is unreadable ({type(err).__name__}: {err}); rebuilding",
                              stacklevel=2)
                path.unlink(missing_ok=True)
        if obj is None:
            obj = _seeded(seed if seed is not None else int(path.stem[-8:], 16), build)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(obj, tmp)
            os.replace(tmp, path)
    _memory[path.stem] = obj
    return obj


def cached_module(name: str, config: dict, make: Callable[[], torch.nn.Module],
                  train: Callable[[torch.nn.Module], None], *, code=(), device="cpu", seed: int | None = None
                  ) -> torch.nn.Module:
    """A module built by `make()` and trained in place by `train(module)`, cached by its state dict.
    Its initial weights and training draw from the seeded stream of `load_or_build`."""

    def build():
        module = make()
        train(module)
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}

    state = load_or_build(name, config, build, code=code, seed=seed)
    module = _seeded(0, make)  # the weights are overwritten; seeding keeps the caller's RNG untouched
    module.load_state_dict(state)
    return module.to(device).eval()


def clear_memory() -> None:
    """Forget the in-process copies (the files stay)."""
    _memory.clear()
