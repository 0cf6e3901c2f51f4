"""alignlab: executable reproductions of alignment and guidance papers.

`import alignlab` is cheap on purpose: it pulls in torch, numpy and matplotlib at most. transformers,
diffusers and trl are imported inside the functions that need them. Submodules are loaded on first use
(`alignlab.guidance`, `alignlab.metrics`, ...).
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = {
    "cache", "cli", "cross_modal", "data", "evaluators", "guidance", "llm_alignment", "lora", "metrics", "models", "papers",
    "plotting", "representation", "runtime", "text", "train", "widgets", "bench",
}

__all__ = ["start", "__version__", *sorted(_SUBMODULES)]


def start(slug, scale="quick", seed=0, device="auto", **kwargs):
    """Open a run for the notebook of paper `slug` (see `alignlab.runtime.start`)."""
    from .runtime import start as _start

    return _start(slug, scale=scale, seed=seed, device=device, **kwargs)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'alignlab' has no attribute {name!r}")
