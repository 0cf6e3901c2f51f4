"""CTC on a synthetic segment "speech" task, and Align With Purpose (AWP, arXiv 2307.01715).

Frames `x` (B, T, D) carry a transcript as consecutive segments (one token template + noise per frame),
separated by silence. A model emits per-frame log-probabilities `logp` (B, T, C) over C = vocab + 1 classes,
blank = 0. Everything here works on that (B, T, C) layout and masks frames t >= length.

CTC marginalises over every alignment (frame path) `a` that collapses to the transcript (merge repeats, drop
blanks) and treats them all alike. AWP adds a hinge loss that prefers, for N paths sampled from the model
itself, a property-improved version a~ = f_prop(a) over the sampled one:

    s(a)   = (1/T_b) sum_{t < T_b} log p_t(a_t)                   (length-normalised path score)
    L_AWP  = mean_{b, n} max(0, s(a^(b,n)) - s(a~^(b,n)) + lambda)
    L      = L_CTC + alpha * L_AWP

`f_low_latency` deletes one leading blank or one repeated frame and appends a blank at the end, so every later
emission moves one frame earlier and the transcript is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

BLANK = 0


# ----------------------------------------------------------------------------- the task

@dataclass
class SegmentBatch:
    """A padded batch of the segment task. `targets` and `onsets` are padded with 0 / -1."""
    x: torch.Tensor               # (B, T, D) frames
    lengths: torch.Tensor         # (B,) frames per utterance
    targets: torch.Tensor         # (B, L) token ids in 1..vocab
    target_lengths: torch.Tensor  # (B,)
    onsets: torch.Tensor          # (B, L) first frame of each token's segment

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, idx) -> "SegmentBatch":
        return SegmentBatch(self.x[idx], self.lengths[idx], self.targets[idx], self.target_lengths[idx],
                            self.onsets[idx])

    def transcripts(self) -> list[list[int]]:
        return [self.targets[i, : self.target_lengths[i]].tolist() for i in range(len(self))]


def token_templates(vocab: int = 8, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """(vocab + 1, dim) templates: row 0 (silence) is zero, rows 1..vocab unit-norm random directions
    scaled by sqrt(dim), fixed by `seed` so that train and test share them."""
    g = torch.Generator().manual_seed(10_007 + seed)
    t = torch.randn(vocab + 1, dim, generator=g)
    t = t / t.norm(dim=1, keepdim=True) * dim ** 0.5
    t[0] = 0
    return t


def segment_task(n: int, vocab: int = 8, min_len: int = 3, max_len: int = 6, seg_len: tuple[int, int] = (3, 5),
                 gap: tuple[int, int] = (0, 3), lead: tuple[int, int] | None = None, dim: int = 16,
                 noise: float = 1.0, seed: int = 0, template_seed: int = 0) -> SegmentBatch:
    """`n` utterances of the synthetic segment "speech" task.

    A transcript has min_len..max_len tokens from 1..vocab with no immediate repeat. It is laid out as
    gap_0, seg_1, gap_1, seg_2, ..., seg_L, gap_L, where each segment lasts seg_len[0]..seg_len[1] frames and
    each gap gap[0]..gap[1] silence frames (uniform, inclusive); the leading silence gap_0 is drawn from `lead`
    instead when given. Frame features: the token's template (zero in
    silence) plus N(0, noise^2) per coordinate. `onsets` holds the first frame of every token."""
    g = torch.Generator().manual_seed(seed)
    temp = token_templates(vocab, dim, template_seed)
    rows = []
    for _ in range(n):
        L = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        toks = [int(torch.randint(1, vocab + 1, (1,), generator=g))]
        while len(toks) < L:  # no immediate repeat: a repeat would need a visible boundary inside one template
            v = int(torch.randint(1, vocab, (1,), generator=g))
            toks.append(v if v < toks[-1] else v + 1)
        frames, onsets = [], []
        first = gap if lead is None else lead
        frames += [0] * int(torch.randint(first[0], first[1] + 1, (1,), generator=g))
        for v in toks:
            onsets.append(len(frames))
            frames += [v] * int(torch.randint(seg_len[0], seg_len[1] + 1, (1,), generator=g))
            frames += [0] * int(torch.randint(gap[0], gap[1] + 1, (1,), generator=g))
        rows.append((toks, frames, onsets))
    T = max(len(r[1]) for r in rows)
    Lm = max(len(r[0]) for r in rows)
    labels = torch.zeros(n, T, dtype=torch.long)
    targets = torch.zeros(n, Lm, dtype=torch.long)
    onsets = torch.full((n, Lm), -1, dtype=torch.long)
    lengths = torch.tensor([len(r[1]) for r in rows])
    target_lengths = torch.tensor([len(r[0]) for r in rows])
    for i, (toks, frames, ons) in enumerate(rows):
        labels[i, : len(frames)] = torch.tensor(frames)
        targets[i, : len(toks)] = torch.tensor(toks)
        onsets[i, : len(ons)] = torch.tensor(ons)
    x = temp[labels] + noise * torch.randn(n, T, dim, generator=g)
    x = x * (torch.arange(T)[None, :, None] < lengths[:, None, None])
    return SegmentBatch(x, lengths, targets, target_lengths, onsets)


# ----------------------------------------------------------------------------- the model

class CausalCTC(torch.nn.Module):
    """A small streaming CTC model whose output at frame t has read frames up to t + `lookahead`.

    kind="conv" (default): a convolution over the window [t - back, t + lookahead], then a causal convolution over
    the last `k2` hidden frames, then a linear layer (like a streaming encoder with a fixed lookahead).
    kind="gru": a GRU that reads the input delayed by `lookahead` frames (the first `lookahead` outputs are
    dropped). kind="bigru": a bidirectional GRU that reads the whole utterance (no latency constraint).
    Returns log-probabilities (B, T, vocab + 1), blank = 0."""

    def __init__(self, dim: int = 16, vocab: int = 8, hidden: int = 64, lookahead: int = 4, kind: str = "conv",
                 back: int = 4, k2: int = 5):
        super().__init__()
        if kind not in ("conv", "gru", "bigru"):
            raise ValueError(f"kind must be 'conv', 'gru' or 'bigru', got {kind!r}")
        self.kind, self.lookahead, self.back, self.k2 = kind, lookahead, back, k2
        if kind == "conv":
            self.c1 = torch.nn.Conv1d(dim, hidden, back + lookahead + 1)
            self.c2 = torch.nn.Conv1d(hidden, hidden, k2)
        else:
            self.rnn = torch.nn.GRU(dim, hidden, batch_first=True, bidirectional=kind == "bigru")
        self.out = torch.nn.Linear(hidden * (2 if kind == "bigru" else 1), vocab + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.lookahead
        if self.kind == "conv":
            h = torch.relu(self.c1(F.pad(x.transpose(1, 2), (self.back, k))))   # window [t - back, t + k]
            h = torch.relu(self.c2(F.pad(h, (self.k2 - 1, 0))))                  # causal over hidden frames
            return self.out(h.transpose(1, 2)).log_softmax(-1)
        if self.kind == "gru":
            h, _ = self.rnn(F.pad(x, (0, 0, 0, k)))                              # k zero frames after the end
            return self.out(h[:, k:]).log_softmax(-1)
        h, _ = self.rnn(x)
        return self.out(h).log_softmax(-1)


def ctc_loss(logp: torch.Tensor, batch: SegmentBatch) -> torch.Tensor:
    """torch's CTC loss (blank 0, mean over the batch of the per-target-length loss, zero_infinity) on (B, T, C)."""
    d = logp.device
    return F.ctc_loss(logp.transpose(0, 1), batch.targets.to(d), batch.lengths.to(d), batch.target_lengths.to(d),
                      blank=BLANK, reduction="mean", zero_infinity=True)


# ----------------------------------------------------------------------------- decoding and metrics

def collapse(path) -> list[int]:
    """The CTC collapse B(a): merge runs of equal labels, then drop blanks."""
    out, prev = [], None
    for a in (path.tolist() if isinstance(path, torch.Tensor) else path):
        if a != prev and a != BLANK:
            out.append(a)
        prev = a
    return out


def emissions(path) -> tuple[list[int], list[int]]:
    """(tokens, frames): the collapsed tokens and the first frame of the run that emits each of them."""
    toks, frames, prev = [], [], None
    for t, a in enumerate(path.tolist() if isinstance(path, torch.Tensor) else path):
        if a != prev and a != BLANK:
            toks.append(a)
            frames.append(t)
        prev = a
    return toks, frames


def greedy_decode(logp: torch.Tensor, lengths: torch.Tensor) -> list[tuple[list[int], list[int]]]:
    """Best-path decoding: argmax per frame, collapse. Returns (tokens, emission frames) per utterance."""
    best = logp.argmax(-1)
    return [emissions(best[i, : lengths[i]]) for i in range(best.shape[0])]


def edit_alignment(hyp: list, ref: list) -> tuple[int, list[tuple[int, int]]]:
    """Levenshtein distance (unit substitution / insertion / deletion costs) and the matched pairs (i_hyp, j_ref)
    of equal tokens on one optimal alignment (ties broken toward matches/substitutions)."""
    n, m = len(hyp), len(ref)
    d = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        d[i][0] = i
    for j in range(m + 1):
        d[0][j] = j
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            d[i][j] = min(d[i - 1][j - 1] + (hyp[i - 1] != ref[j - 1]), d[i - 1][j] + 1, d[i][j - 1] + 1)
    pairs, i, j = [], n, m
    while i > 0 and j > 0:
        if d[i][j] == d[i - 1][j - 1] + (hyp[i - 1] != ref[j - 1]):
            if hyp[i - 1] == ref[j - 1]:
                pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif d[i][j] == d[i - 1][j] + 1:
            i -= 1
        else:
            j -= 1
    return d[n][m], pairs[::-1]


def edit_distance(hyp: list, ref: list) -> int:
    return edit_alignment(hyp, ref)[0]


def evaluate(model: torch.nn.Module, batch: SegmentBatch, chunk: int = 512) -> dict:
    """Greedy-decode `batch` and measure: `ter` = sum edit distance / sum reference length (token error rate),
    `delay` = mean over correctly decoded tokens (matched on an optimal edit alignment) of emission frame minus
    the token's onset frame, and the per-token `delays` (a tensor)."""
    model.eval()
    dev = next(model.parameters()).device
    errs, n_ref, delays = 0, 0, []
    with torch.no_grad():
        for s in range(0, len(batch), chunk):
            b = batch[s: s + chunk]
            for (toks, frames), ref, ons in zip(greedy_decode(model(b.x.to(dev)).cpu(), b.lengths), b.transcripts(),
                                                b.onsets.tolist()):
                dist, pairs = edit_alignment(toks, ref)
                errs, n_ref = errs + dist, n_ref + len(ref)
                delays += [frames[i] - ons[j] for i, j in pairs]
    delays = torch.tensor(delays, dtype=torch.float)
    return {"ter": errs / n_ref, "delay": delays.mean().item() if len(delays) else float("nan"),
            "delays": delays}


# ----------------------------------------------------------------------------- AWP

def sample_alignments(logp: torch.Tensor, lengths: torch.Tensor, n: int, temperature: float = 1.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, n, T) paths with a_t ~ Categorical(softmax(logp_t / temperature)) independently per frame, from the
    detached posteriors (sampling is not differentiated). Frames t >= length are set to blank."""
    B, T, C = logp.shape
    probs = (logp.detach() / temperature).softmax(-1).reshape(B * T, C)
    paths = torch.multinomial(probs, n, replacement=True, generator=generator)  # (B*T, n)
    paths = paths.reshape(B, T, n).transpose(1, 2)
    valid = torch.arange(T, device=logp.device) < lengths[:, None].to(logp.device)
    return paths.masked_fill(~valid[:, None, :], BLANK)


def path_scores(logp: torch.Tensor, paths: torch.Tensor, lengths: torch.Tensor, normalize: bool = True
                ) -> torch.Tensor:
    """(B, N) scores sum_{t < T_b} log p_t(a_t) of paths (B, N, T), divided by T_b when `normalize`.
    Differentiable with respect to `logp`."""
    B, T, C = logp.shape
    lp = logp.unsqueeze(1).expand(B, paths.shape[1], T, C).gather(-1, paths.unsqueeze(-1)).squeeze(-1)
    valid = torch.arange(T, device=logp.device) < lengths[:, None].to(logp.device)
    s = (lp * valid[:, None, :]).sum(-1)
    return s / lengths[:, None].to(s) if normalize else s


def f_low_latency(paths: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """The low-latency property function, on (B, N, T) paths. Per path, pick uniformly one frame t < T_b that is a
    leading blank (t = 0, a_0 = blank) or a repeat (a_t = a_{t-1}; repeated blanks included), delete it and
    append a blank at frame T_b - 1: every emission after t moves one frame earlier and the collapse is unchanged.
    A path with no such frame is returned unchanged."""
    B, N, T = paths.shape
    t = torch.arange(T, device=paths.device)
    valid = t < lengths[:, None, None].to(paths.device)                    # (B, 1, T)
    cand = torch.zeros_like(paths, dtype=torch.bool)
    cand[..., 0] = paths[..., 0] == BLANK
    cand[..., 1:] = paths[..., 1:] == paths[..., :-1]
    cand &= valid
    u = torch.rand(paths.shape, generator=generator, device=paths.device)
    r = u.masked_fill(~cand, -1.0).argmax(-1, keepdim=True)                  # the deleted frame
    src = (t + (t >= r)).clamp(max=T - 1)                                    # frames after r come one earlier
    out = paths.gather(-1, src)
    last = t == (lengths[:, None, None].to(paths.device) - 1)
    out = out.masked_fill(last | ~valid, BLANK)
    return torch.where(cand.any(-1, keepdim=True), out, paths)


def awp_loss(logp: torch.Tensor, lengths: torch.Tensor, n_paths: int = 5, margin: float = 0.0,
             f_prop: Callable = f_low_latency, temperature: float = 1.0,
             generator: torch.Generator | None = None, return_paths: bool = False):
    """L_AWP = mean_{b,n} max(0, s(a) - s(f_prop(a)) + margin), s the length-normalised path score.

    Paths are sampled from the detached posteriors; both scores carry gradients through `logp`. With margin > 0,
    pairs left identical by f_prop are ignored (they would otherwise cost exactly `margin`). The released module
    sums over the N paths and divides by the batch size, i.e. N times this mean (a rescaled alpha)."""
    paths = sample_alignments(logp, lengths, n_paths, temperature, generator)
    better = f_prop(paths, lengths, generator=generator)
    diff = path_scores(logp, paths, lengths) - path_scores(logp, better, lengths)
    loss = (diff + margin).clamp(min=0)
    if margin > 0:
        loss = loss * (paths != better).any(-1)
    loss = loss.mean()
    return (loss, paths, better) if return_paths else loss


# ----------------------------------------------------------------------------- training

def train_ctc(model: torch.nn.Module, data: SegmentBatch, steps: int, lr: float = 3e-3, batch: int = 64,
              alpha: float = 0.0, n_paths: int = 5, margin: float = 0.0, temperature: float = 1.0, seed: int = 0,
              desc: str = "train CTC", progress: bool = True) -> list[float]:
    """Minimise L_CTC + alpha * L_AWP(f_low_latency) on random minibatches of `data` with `alignlab.train.fit`
    (AdamW, one-cycle learning rate), in place. alpha = 0 is plain CTC. Returns the loss per step."""
    from ..train import fit

    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device

    def loss_fn(m, step):
        b = data[torch.randint(0, len(data), (batch,), generator=g)]
        T = int(b.lengths.max())
        logp = m(b.x[:, :T].to(dev))
        loss = ctc_loss(logp, b)
        if alpha:
            loss = loss + alpha * awp_loss(logp, b.lengths, n_paths, margin, temperature=temperature,
                                           generator=g if dev.type == "cpu" else None)
        return loss

    return fit(model, loss_fn, steps, lr=lr, desc=desc, progress=progress)
