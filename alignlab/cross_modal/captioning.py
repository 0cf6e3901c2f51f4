"""Noise-aware captioning (NoC, arXiv 2212.13563) on 8x8 digits with templated attribute captions.

The pieces, in the order a run uses them:

- `fit_attribute_thresholds`, `attributes`, `captions`: a caption is 4 field words computed from the image,
  `<digit> <thin|thick> <left|upright|right> <small|large>`; thresholds are fitted on the training images.
- `misalign`: web-like noise. A fraction `rate` of the pairs is misaligned: half take another image's
  caption, half keep their caption with the digit word replaced by a different digit.
- `DualEncoder` + `info_nce`: a small CLIP-like scorer trained on the noisy pairs themselves;
  alignment score $s = \\cos(f(x), g(c))$.
- `fit_buckets`, `bucketize`: uniform-width bins over the training scores (sklearn's
  `KBinsDiscretizer(strategy="uniform")` as in the official `get_noc_bucket.py`), applied with the inner
  edges and `right=True` like the official `AlignmentLevelBucket`.
- `Captioner`: a prefix language model; prefix = [image token ; control embedding $E[z]$] (the control token
  is appended after the visual token, as in the official captioner); `n_control=0` is the vanilla model.
- `fit_captioner` (teacher forcing, token cross-entropy), `greedy_decode`, `field_accuracy`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import train

FIELDS = ("digit", "thickness", "slant", "size")
FIELD_WORDS = {
    "digit": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
    "thickness": ["thin", "thick"],
    "slant": ["left", "upright", "right"],
    "size": ["small", "large"],
}
PAD, BOS, EOS = 0, 1, 2
VOCAB = ["<pad>", "<bos>", "<eos>"] + [w for f in FIELDS for w in FIELD_WORDS[f]]
_OFFSET = {}
_o = 3
for _f in FIELDS:
    _OFFSET[_f] = _o
    _o += len(FIELD_WORDS[_f])
CAPTION_LEN = len(FIELDS)


# ----------------------------------------------------------------------------- captions from pixels

def _ink(x: torch.Tensor) -> torch.Tensor:
    """Images (N, 1, H, W) in [-1, 1] -> ink in [0, 1], shape (N, H, W)."""
    return ((x + 1) / 2).clamp(0, 1).flatten(0, 1) if x.dim() == 4 else ((x + 1) / 2).clamp(0, 1)


def raw_attributes(x: torch.Tensor, ink_threshold: float = 0.3) -> dict[str, torch.Tensor]:
    """Continuous attributes of each image:

    - mass $m = \\sum_{ij} p_{ij}$ (ink $p = (x+1)/2$);
    - slant $= -\\mathrm{cov}(r, c) / \\mathrm{var}(r)$ under the ink distribution (row r grows downwards, so a
      stroke whose top leans right has negative row-column covariance and positive slant);
    - box = height x width of the bounding box of pixels with ink > `ink_threshold`."""
    p = _ink(x)
    n, h, w = p.shape
    r = torch.arange(h, dtype=p.dtype).view(1, h, 1)
    c = torch.arange(w, dtype=p.dtype).view(1, 1, w)
    mass = p.sum((1, 2))
    z = mass.clamp_min(1e-8)
    rbar = (p * r).sum((1, 2)) / z
    cbar = (p * c).sum((1, 2)) / z
    dr, dc = r - rbar.view(n, 1, 1), c - cbar.view(n, 1, 1)
    cov = (p * dr * dc).sum((1, 2)) / z
    var_r = (p * dr * dr).sum((1, 2)) / z
    slant = -cov / var_r.clamp_min(1e-8)
    on = p > ink_threshold
    rows, cols = on.any(2), on.any(1)
    idx_h, idx_w = torch.arange(h), torch.arange(w)
    height = torch.where(rows, idx_h, -1).amax(1) - torch.where(rows, idx_h, h).amin(1) + 1
    width = torch.where(cols, idx_w, -1).amax(1) - torch.where(cols, idx_w, w).amin(1) + 1
    box = (height.clamp_min(0) * width.clamp_min(0)).to(p.dtype)
    return {"mass": mass, "slant": slant, "box": box}


def fit_attribute_thresholds(x_train: torch.Tensor) -> dict[str, torch.Tensor]:
    """Balanced cut points from the training images: median mass, slant tertiles, median box area."""
    a = raw_attributes(x_train)
    q = torch.tensor([1 / 3, 2 / 3], dtype=a["slant"].dtype)
    return {"mass": a["mass"].median(), "slant": torch.quantile(a["slant"], q), "box": a["box"].median()}


def attributes(x: torch.Tensor, y: torch.Tensor, thresholds: dict[str, torch.Tensor]) -> torch.Tensor:
    """Field values (N, 4): digit, thickness (0 thin, 1 thick), slant (0 left, 1 upright, 2 right), size
    (0 small, 1 large). A value equal to a cut point goes to the upper class."""
    a = raw_attributes(x)
    thick = (a["mass"] >= thresholds["mass"]).long()
    slant = torch.bucketize(a["slant"], thresholds["slant"], right=True)
    large = (a["box"] >= thresholds["box"]).long()
    return torch.stack([y.long(), thick, slant, large], 1)


def to_tokens(values: torch.Tensor) -> torch.Tensor:
    """Field values (N, 4) -> token ids (N, 4) in `VOCAB`."""
    off = torch.tensor([_OFFSET[f] for f in FIELDS])
    return values.long() + off


def to_values(tokens: torch.Tensor) -> torch.Tensor:
    """Token ids (N, 4) -> field values (N, 4); a token that is not a word of that field gives -1."""
    off = torch.tensor([_OFFSET[f] for f in FIELDS])
    size = torch.tensor([len(FIELD_WORDS[f]) for f in FIELDS])
    v = tokens.long() - off
    return torch.where((v >= 0) & (v < size), v, torch.full_like(v, -1))


def captions(x: torch.Tensor, y: torch.Tensor, thresholds: dict[str, torch.Tensor]) -> torch.Tensor:
    """The aligned caption of each image as token ids (N, 4)."""
    return to_tokens(attributes(x, y, thresholds))


def render(tokens) -> list[str]:
    """Token ids (N, L) -> strings (stops at EOS, skips PAD and BOS)."""
    out = []
    for row in torch.as_tensor(tokens).tolist():
        words = []
        for t in row:
            if t == EOS:
                break
            if t not in (PAD, BOS):
                words.append(VOCAB[t])
        out.append(" ".join(words))
    return out


def misalign(tokens: torch.Tensor, rate, swap_share: float = 0.5, confusion: torch.Tensor | None = None,
             seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Misalign pairs, each independently with probability `rate` (a number, or one probability per pair).
    A share `swap_share` of the misaligned pairs takes another random pair's caption (kind 1); the others keep
    their caption with the digit word d replaced (kind 2) by `confusion[d]` (systematic noise, like web
    alt-text that names a related but absent object) or, without `confusion`, by a uniformly drawn other
    digit. Returns (tokens, kind) with kind 0 for the untouched pairs."""
    g = torch.Generator().manual_seed(seed)
    n = len(tokens)
    p = torch.as_tensor(rate, dtype=torch.float64).expand(n)
    if (p < 0).any() or (p > 1).any() or not 0 <= swap_share <= 1:
        raise ValueError("rate and swap_share must lie in [0, 1]")
    u = torch.rand(n, generator=g, dtype=torch.float64)
    v = torch.rand(n, generator=g, dtype=torch.float64)
    noisy = u < p
    swap = (noisy & (v < swap_share)).nonzero().flatten()
    word = (noisy & (v >= swap_share)).nonzero().flatten()
    out, kind = tokens.clone(), torch.zeros(n, dtype=torch.long)
    if len(swap):
        donor = (swap + torch.randint(1, n, (len(swap),), generator=g)) % n  # never the pair itself
        out[swap] = tokens[donor]
        kind[swap] = 1
    if len(word):
        d = tokens[word, 0] - _OFFSET["digit"]
        if confusion is None:
            new = (d + torch.randint(1, 10, (len(word),), generator=g)) % 10  # always a different digit
        else:
            new = torch.as_tensor(confusion, dtype=torch.long)[d]
        out[word, 0] = new + _OFFSET["digit"]
        kind[word] = 2
    return out, kind


def derangement(n: int = 10, seed: int = 0) -> torch.Tensor:
    """A random permutation of 0..n-1 without fixed points (a systematic confusion d -> c[d] != d)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        c = torch.randperm(n, generator=g)
        if (c != torch.arange(n)).all():
            return c


def class_rates(y: torch.Tensor, mean: float, spread: float, seed: int = 0) -> torch.Tensor:
    """Per-pair noise probability that depends on the class: the 10 classes, in a seeded random order, get
    rates evenly spaced over [mean - spread, mean + spread] (clipped to [0, 1]); web noise is uneven."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(10, generator=g)
    levels = torch.linspace(mean - spread, mean + spread, 10, dtype=torch.float64).clamp(0, 1)
    per_class = torch.empty(10, dtype=torch.float64)
    per_class[order] = levels
    return per_class[y.long()]


# ----------------------------------------------------------------------------- the alignment scorer

def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP's loss) of matched rows of unit vectors a, b:
    $\\tfrac12[\\mathrm{CE}(a b^\\top/\\tau, I) + \\mathrm{CE}(b a^\\top/\\tau, I)]$."""
    logits = a @ b.T / temperature
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


class DualEncoder(nn.Module):
    """A tiny CLIP: image MLP 64 -> hidden -> dim, caption = sum of its token embeddings -> MLP -> dim."""

    def __init__(self, dim: int = 64, hidden: int = 128, vocab_size: int = len(VOCAB)):
        super().__init__()
        self.image = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.tok = nn.Embedding(vocab_size, hidden, padding_idx=PAD)
        self.text_mlp = nn.Sequential(nn.GELU(), nn.Linear(hidden, dim))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(x), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_mlp(self.tok(tokens).sum(1)), dim=-1)

    @torch.no_grad()
    def score(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Alignment score of each pair: the cosine $s_i = \\cos(f(x_i), g(c_i))$."""
        return (self.encode_image(x) * self.encode_text(tokens)).sum(-1)


def fit_scorer(model: DualEncoder, x: torch.Tensor, tokens: torch.Tensor, steps: int, batch_size: int = 128,
               lr: float = 3e-3, temperature: float = 0.1, seed: int = 0, progress: bool = True) -> list[float]:
    """InfoNCE on the (noisy) pairs with in-batch negatives, in place."""
    g = torch.Generator().manual_seed(seed)

    def loss(m, step):
        idx = torch.randperm(len(x), generator=g)[:batch_size]
        return info_nce(m.encode_image(x[idx]), m.encode_text(tokens[idx]), temperature)

    return train.fit(model, loss, steps, lr=lr, weight_decay=1e-4, desc="scorer (InfoNCE)", progress=progress)


# ----------------------------------------------------------------------------- bucketing

def fit_buckets(scores: torch.Tensor, n_bins: int = 8) -> torch.Tensor:
    """Uniform-width bin edges (n_bins + 1) over [min, max] of the training scores
    (`KBinsDiscretizer(strategy="uniform")`)."""
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    return torch.linspace(scores.min().item(), scores.max().item(), n_bins + 1, dtype=torch.float64)


def bucketize(scores: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Bucket $z = \\#\\{k : e_k \\le s\\}$ over the inner edges $e_1..e_{K-1}$: 0..K-1, scores outside the
    fitted range are clipped into the end buckets (the edges stay fixed at test time)."""
    return torch.bucketize(scores.to(torch.float64), edges[1:-1].to(torch.float64), right=True)


def top_populated(z: torch.Tensor, n_bins: int, min_count: int = 1) -> int:
    """The highest bucket holding at least `min_count` training pairs (uniform bins can leave the top sparse)."""
    counts = torch.bincount(z, minlength=n_bins)
    ok = (counts >= min_count).nonzero().flatten()
    return int(ok.max()) if len(ok) else n_bins - 1


# ----------------------------------------------------------------------------- the captioner

class Captioner(nn.Module):
    """Prefix LM: sequence [v ; E[z] ; BOS, w_1 .. w_L] through a causal transformer, predicting w_1 .. w_L, EOS.
    v = image MLP(x); E is the control embedding (absent when n_control = 0: the vanilla captioner)."""

    def __init__(self, n_control: int = 0, d: int = 64, layers: int = 2, heads: int = 4, dropout: float = 0.0,
                 vocab_size: int = len(VOCAB), max_len: int = CAPTION_LEN + 1):
        super().__init__()
        self.n_control, self.max_len = n_control, max_len
        self.image = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.GELU(), nn.Linear(128, d))
        self.control = nn.Embedding(n_control, d) if n_control else None
        self.tok = nn.Embedding(vocab_size, d)
        self.n_prefix = 1 + (1 if n_control else 0)
        self.pos = nn.Parameter(torch.randn(self.n_prefix + max_len, d) * 0.02)
        block = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.body = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab_size)

    def prefix(self, x: torch.Tensor, control: torch.Tensor | None = None) -> torch.Tensor:
        parts = [self.image(x)[:, None]]
        if self.control is not None:
            if control is None:
                raise ValueError("this captioner needs a control bucket per image")
            parts.append(self.control(control.long())[:, None])
        return torch.cat(parts, 1)

    def forward(self, x: torch.Tensor, inputs: torch.Tensor, control: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (N, T, V) of the next token after each of `inputs` (N, T) (BOS first)."""
        h = torch.cat([self.prefix(x, control), self.tok(inputs)], 1)
        h = h + self.pos[: h.shape[1]]
        t = h.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf"), device=h.device), 1)
        h = self.body(h, mask=mask)
        return self.head(self.norm(h[:, self.n_prefix:]))


def caption_loss(model: Captioner, x: torch.Tensor, tokens: torch.Tensor, control: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Teacher forcing: token cross-entropy of [w_1 .. w_L, EOS] given [BOS, w_1 .. w_L]."""
    n = len(tokens)
    bos = torch.full((n, 1), BOS, dtype=torch.long)
    eos = torch.full((n, 1), EOS, dtype=torch.long)
    logits = model(x, torch.cat([bos, tokens], 1), control)
    target = torch.cat([tokens, eos], 1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def fit_captioner(model: Captioner, x: torch.Tensor, tokens: torch.Tensor, control: torch.Tensor | None,
                  steps: int, batch_size: int = 128, lr: float = 3e-3, seed: int = 0, desc: str = "captioner",
                  progress: bool = True) -> list[float]:
    """Minibatch teacher forcing on every given pair (AdamW, one-cycle), in place. `control` is each pair's
    own bucket (NoC) or None (vanilla / filtering)."""
    g = torch.Generator().manual_seed(seed)

    def loss(m, step):
        idx = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=g)
        return caption_loss(m, x[idx], tokens[idx], None if control is None else control[idx])

    return train.fit(model, loss, steps, lr=lr, weight_decay=1e-4, desc=desc, progress=progress)


@torch.no_grad()
def greedy_decode(model: Captioner, x: torch.Tensor, control: int | torch.Tensor | None = None,
                  max_len: int = CAPTION_LEN + 1) -> torch.Tensor:
    """Greedy decoding from BOS: w_t = argmax p(w | v, E[z], w_<t). `control` is one bucket for every image
    or one per image. Returns (N, max_len) token ids; positions after EOS are PAD."""
    model.eval()
    n = len(x)
    if isinstance(control, int):
        control = torch.full((n,), control, dtype=torch.long)
    seq = torch.full((n, 1), BOS, dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    out = []
    for _ in range(max_len):
        nxt = model(x, seq, control)[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
        out.append(nxt)
        done |= nxt == EOS
        seq = torch.cat([seq, nxt[:, None]], 1)
    return torch.stack(out, 1)


def field_accuracy(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Per-field accuracy of decoded captions (the word at position i must be field i's correct word) and the
    exact-match rate (all fields right, then EOS)."""
    pv = to_values(pred[:, :CAPTION_LEN])
    tv = to_values(target[:, :CAPTION_LEN])
    hit = pv == tv
    out = {f: hit[:, i].float().mean().item() for i, f in enumerate(FIELDS)}
    ends = pred[:, CAPTION_LEN] == EOS if pred.shape[1] > CAPTION_LEN else torch.ones(len(pred), dtype=torch.bool)
    out["exact"] = (hit.all(1) & ends).float().mean().item()
    return out
