"""Tiny GPT-2-style causal LMs on the `ToyWorld`: build, pretrain, SFT (cached), sample, score.

A batch is a dict of LongTensors [B, T]: `input_ids`, `attention_mask` (1 on real tokens, padding may sit on
either side) and `loss_mask` (1 on RESPONSE tokens, `<eos>` included). Position ids are always
`cumsum(attention_mask) - 1`, so left and right padding give the same log-probabilities.

    log pi(y | x) = sum_t loss_mask[t] * log softmax(logits[t-1])[input_ids[t]]         (`sequence_logps`)
    KL_t(pi || ref) = sum_v pi(v | s_<t) (log pi(v | s_<t) - log ref(v | s_<t))         (`token_kl`)

transformers is imported inside the functions (`import alignlab` stays cheap).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .. import cache, train
from . import losses
from . import world as world_mod

SCALES = {
    "quick": dict(n_layer=2, n_head=2, d_model=64, pretrain_steps=150, pretrain_batch=64, pretrain_lr=3e-3,
                  corpus=20000, sft_steps=60, sft_batch=64, sft_lr=1e-3, sft_n=4000),
    "paper": dict(n_layer=4, n_head=4, d_model=128, pretrain_steps=3000, pretrain_batch=128, pretrain_lr=1e-3,
                  corpus=200000, sft_steps=1000, sft_batch=128, sft_lr=3e-4, sft_n=40000),
}


def scale_params(scale: str, **overrides) -> dict:
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid scales: quick, paper")
    return {**SCALES[scale], **overrides}


def build_tiny_lm(vocab_size: int, n_layer: int = 2, n_head: int = 2, d_model: int = 64,
                  n_positions: int = 48, pad_id: int = 0, bos_id: int = 1, eos_id: int = 3):
    """A `GPT2LMHeadModel` from a `GPT2Config` (no dropout, tied embeddings), in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=d_model, n_layer=n_layer,
                     n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=pad_id,
                     bos_token_id=bos_id, eos_token_id=eos_id)
    return GPT2LMHeadModel(cfg).eval()


# ---------------------------------------------------------------- batches
def make_batch(prompts, responses, pad_id: int = 0, side: str = "right") -> dict:
    """Concatenate token lists prompt_i + response_i and pad to one length (`side` = "right" or "left").
    `loss_mask` is 1 on the response tokens. Responses may be empty."""
    seqs = [list(map(int, x)) + list(map(int, y)) for x, y in zip(prompts, responses, strict=True)]
    T = max(len(s) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    att = torch.zeros(B, T, dtype=torch.long)
    lm = torch.zeros(B, T, dtype=torch.long)
    for i, (x, s) in enumerate(zip(prompts, seqs)):
        o = 0 if side == "right" else T - len(s)
        ids[i, o:o + len(s)] = torch.tensor(s)
        att[i, o:o + len(s)] = 1
        lm[i, o + len(x):o + len(s)] = 1
    return {"input_ids": ids, "attention_mask": att, "loss_mask": lm}


def _positions(attention_mask):
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def to_device(batch: dict, device) -> dict:
    """The batch's tensors on `device` (other entries, e.g. `responses`, as they are)."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def token_logits(model, batch) -> torch.Tensor:
    """Logits [B, T, V] with position ids from the attention mask (on the model's device)."""
    dev = _device(model)
    att = batch["attention_mask"].to(dev)
    ids = batch["input_ids"].to(dev)
    return model(input_ids=ids, attention_mask=att, position_ids=_positions(att)).logits


def token_logps(model, batch) -> torch.Tensor:
    """log pi(s_t | s_<t) for t = 1..T-1, zero where loss_mask is 0: shape [B, T-1] (`losses.token_logps` on the
    model's logits)."""
    logits = token_logits(model, batch).float()
    b = to_device(batch, logits.device)
    return losses.token_logps(logits, b["input_ids"], b["loss_mask"])


def sequence_logps(model, batch, *, average: bool = False) -> torch.Tensor:
    """Sum (or mean, `average`) of the response tokens' log-probabilities: [B]. A row with no response token
    has sum 0 (and mean 0)."""
    lp = token_logps(model, batch)
    if not average:
        return lp.sum(-1)
    return lp.sum(-1) / batch["loss_mask"][:, 1:].to(lp.device).sum(-1).clamp(min=1)


@torch.no_grad()
def batched_logps(model, prompts, responses, *, average: bool = False, batch: int = 256,
                  pad_id: int = 0) -> torch.Tensor:
    """`sequence_logps` of every (prompt, response) row, without gradients, in chunks of `batch`: [N] on the
    CPU. `average=True` gives the length-normalised (1/|y|) log pi(y | x)."""
    out = [sequence_logps(model, make_batch(prompts[i:i + batch], responses[i:i + batch], pad_id=pad_id),
                          average=average).cpu() for i in range(0, len(prompts), batch)]
    return torch.cat(out) if out else torch.zeros(0)


def token_kl(model, ref, batch) -> torch.Tensor:
    """Exact per-token KL(pi || ref) over the vocabulary at every response position: [B, T-1]
    (0 off the mask).
    `ref` runs without gradients."""
    logp = torch.log_softmax(token_logits(model, batch)[:, :-1].float(), -1)
    with torch.no_grad():
        logq = torch.log_softmax(token_logits(ref, batch)[:, :-1].float(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return torch.where(batch["loss_mask"][:, 1:].to(kl.device).bool(), kl, torch.zeros_like(kl))


def sequence_kl(model, ref, batch) -> torch.Tensor:
    """Sum over response positions of the exact per-token KL: [B]."""
    return token_kl(model, ref, batch).sum(-1)


# ---------------------------------------------------------------- sampling
@torch.no_grad()
def sample(model, prompts, *, n: int = 1, max_new_tokens: int = 15, temperature: float = 1.0, eos_id: int = 3,
           pad_id: int = 0, generator: torch.Generator | None = None, seed: int | None = None) -> dict:
    """Sample `n` responses per prompt (rows grouped by prompt: prompt i at rows i*n .. i*n+n-1).

    Prompts are left-padded, so every response starts in the same column; a row stops after its `<eos>`
    (later tokens are `pad_id`, outside the masks). temperature 0 is greedy. Returns a batch dict (prompt +
    response, `loss_mask` on the response) plus `responses`: list of token lists ending in `<eos>` when one
    was sampled. Reproducible with `generator` (or `seed`)."""
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    prompts = [list(map(int, p)) for p in prompts for _ in range(n)]
    b = make_batch(prompts, [[] for _ in prompts], pad_id=pad_id, side="left")
    dev = _device(model)
    ids, att = b["input_ids"].to(dev), b["attention_mask"].to(dev)
    B, P = ids.shape
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    was_training = model.training
    model.eval()
    past, step_ids, pos = None, ids, _positions(att)
    new = []
    for _ in range(max_new_tokens):
        out = model(input_ids=step_ids, attention_mask=att, position_ids=pos, past_key_values=past,
                    use_cache=True)
        past = out.past_key_values
        logits = out.logits[:, -1].float()
        if temperature == 0:
            tok = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, -1)
            if probs.device != generator.device:  # a CPU generator for a GPU model
                probs = probs.cpu()
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(dev)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        new.append(tok)
        alive = (~done).long()
        att = torch.cat([att, alive[:, None]], 1)
        done = done | (tok == eos_id)
        step_ids = tok[:, None]
        pos = pos[:, -1:] + 1
        if done.all():
            break
    model.train(was_training)
    resp = torch.stack(new, 1)
    lm = torch.cat([torch.zeros(B, P, dtype=torch.long, device=dev), att[:, P:]], 1)
    responses = [r[m.bool()].tolist() for r, m in zip(resp, att[:, P:])]
    return {"input_ids": torch.cat([ids, resp], 1), "attention_mask": att, "loss_mask": lm,
            "responses": responses}


# ---------------------------------------------------------------- training
def _lm_loss(model, batch) -> torch.Tensor:
    """Token-mean cross-entropy over the loss mask (the label-masked mean of HF's causal LM loss)."""
    lp = token_logps(model, batch)
    return -lp.sum() / batch["loss_mask"][:, 1:].to(lp.device).sum().clamp(min=1)


def pretrain(model, corpus: list[list[int]], steps: int, batch: int = 64, lr: float = 3e-3, pad_id: int = 0,
             seed: int = 0, progress: bool = False) -> list[float]:
    """Next-token training on whole sequences (every token after `<bos>` in the loss); batches from `seed`."""
    g = np.random.default_rng(seed)

    def loss_fn(m, step):
        idx = g.integers(0, len(corpus), batch)
        seqs = [corpus[i] for i in idx]
        b = make_batch([s[:1] for s in seqs], [s[1:] for s in seqs], pad_id=pad_id)
        return _lm_loss(m, b)

    return train.fit(model, loss_fn, steps, lr=lr, desc="pretrain", progress=progress)


def sft(model, prompts: list[list[int]], responses: list[list[int]], steps: int, batch: int = 64,
        lr: float = 1e-3, pad_id: int = 0, weights=None, seed: int = 0,
        progress: bool = False) -> list[float]:
    """Supervised fine-tuning on the response tokens only (token-mean CE); `weights` [N] resample."""
    g = np.random.default_rng(seed)
    p = None if weights is None else np.asarray(weights, float) / np.sum(weights)

    def loss_fn(m, step):
        idx = g.choice(len(prompts), batch, p=p)
        return _lm_loss(m, make_batch([prompts[i] for i in idx], [responses[i] for i in idx], pad_id=pad_id))

    return train.fit(model, loss_fn, steps, lr=lr, desc="sft", progress=progress)


def frozen_copy(model):
    import copy

    return copy.deepcopy(model).eval().requires_grad_(False)


_timings: dict[str, float] = {}


def _make(world, p):
    return build_tiny_lm(world.vocab_size, p["n_layer"], p["n_head"], p["d_model"],
                         n_positions=world.max_len + 4,
                         pad_id=world.pad_id, bos_id=world.bos_id, eos_id=world.eos_id)


def _config(world, p, seed, stage):
    return {"world": world.config.__dict__, "params": p, "seed": seed, "stage": stage}


def pretrained_lm(world=None, scale: str = "quick", seed: int = 0, device="cpu", **overrides):
    """The base LM: pretrained on `world.pretrain_corpus`, cached (the key holds the world config, the preset,
    the seed, and the source of the world module and of the training functions here). The process (CPU)
    seconds of a build go to `last_timings()`. `device` trains and returns the model there (not keyed)."""
    world = world or world_mod.ToyWorld()
    p = scale_params(scale, **overrides)

    def fit(m):
        m.to(device)
        t = time.process_time()
        corpus = world.pretrain_corpus(p["corpus"], seed=seed + 1)
        pretrain(m, corpus, p["pretrain_steps"], p["pretrain_batch"], p["pretrain_lr"], world.pad_id,
                 seed=seed)
        _timings["pretrain_cpu_s"] = time.process_time() - t

    return cache.cached_module("llm_pretrained", _config(world, p, seed, "pretrain"),
                               lambda: _make(world, p), fit,
                               code=(world_mod, train, pretrained_lm, _make, pretrain, _lm_loss, make_batch,
                                     token_logps, token_logits, to_device, _device),
                               device=device, seed=seed)


def sft_lm(world=None, scale: str = "quick", seed: int = 0, device="cpu", **overrides):
    """The SFT model (the usual reference policy): `pretrained_lm` fine-tuned on `world.sft_data` (cached)."""
    world = world or world_mod.ToyWorld()
    p = scale_params(scale, **overrides)
    base_state = pretrained_lm(world, scale, seed, "cpu", **overrides).state_dict()

    def make():
        m = _make(world, p)
        m.load_state_dict(base_state)
        return m

    def fit(m):
        m.to(device)
        t = time.process_time()
        xs, ys = world.sft_data(p["sft_n"], seed=seed + 2)
        sft(m, xs.ids, ys, p["sft_steps"], p["sft_batch"], p["sft_lr"], world.pad_id, seed=seed)
        _timings["sft_cpu_s"] = time.process_time() - t

    return cache.cached_module("llm_sft", _config(world, p, seed, "sft"), make, fit,
                               code=(world_mod, train, pretrained_lm, sft_lm, _make, pretrain, sft, _lm_loss,
                                     make_batch, token_logps, token_logits, to_device, _device),
                               device=device, seed=seed)


def last_timings() -> dict:
    """CPU seconds of the last pretrain / SFT builds in this process (empty after cache hits)."""
    return dict(_timings)
