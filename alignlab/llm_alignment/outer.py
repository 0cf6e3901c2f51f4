r"""Outer-alignment recipes of the LLM-alignment survey (arXiv 2309.15025) on the `ToyWorld`, one small
instance each.

- A Bradley-Terry **reward model** $r_\phi(x, y) = w^\top \phi(x, y)$, linear in bag-of-words features of the
  response read against the prompt (`response_features`), fitted with
  $-\log\sigma(r_\phi(y_w) - r_\phi(y_l))$.
- **RLHF** (RL-based, non-recursive oversight): maximise $\mathbb E_{y\sim\pi}[r_\phi(x, y)] - \beta\,
  \mathrm{KL}(\pi\,\|\,\pi_{ref})$ by REINFORCE with a leave-one-out baseline on the KL-shaped reward
  $\tilde r = r_\phi - \beta(\log\pi - \log\pi_{ref})$ (`rlhf_reinforce`).
- **DPO** (SL-based) on the same labelled pairs (`alignlab.llm_alignment.preference.preference_train`).
- **Rejection-sampling SFT** (SL-based): SFT on the best of $n$ reference samples by $r_\phi$
  (`rejection_sampling_sft`).
- The closed-form optimum of the RLHF objective,
  $\pi^\*(y\mid x) \propto \pi_{ref}(y\mid x)\,e^{r(x,y)/\beta}$, estimated on reference samples by
  self-normalised weights (`tilted_weights`, `tilted_stats`): the KL/reward frontier
  without training.
- Judges for scalable oversight: a partial-view **weak judge** that scores only the first half of a response
  and a
  **decomposed judge** that scores both halves separately and sums (`judge_scores`).
- Inner alignment, goal misgeneralisation: prompts carrying a spurious **cue word** whose topic agrees with the
  prompt's topic in training and is moved to another topic at test time (`spurious_cue_prompts`; RLHF on them
  through `rlhf_reinforce(..., prompt_fn=...)`).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import train as base_train
from . import dual, lm, losses

__all__ = ["response_features", "LinearRewardModel", "fit_reward_model", "rlhf_reinforce",
           "rejection_sampling_sft", "tilted_weights", "tilted_stats", "judge_scores", "split_halves",
           "spurious_cue_prompts"]


def response_features(world, prompts, responses) -> torch.Tensor:
    r"""$\phi(x, y)$ = [distinct response words (V), response word counts (V), distinct response words of
    the
    prompt's topic (V; the topic read off the prompt's words), the prompt's "how to" word in the response
    (1)].
    Shape [N, 3V + 1]."""
    V = world.vocab_size
    out = np.zeros((len(responses), 3 * V + 1), np.float32)
    for i, (x, y) in enumerate(zip(prompts.ids, responses)):
        w = np.array(world.response_words(y), dtype=int)
        if w.size == 0:
            continue
        t = world.topic_of[np.array(x)]
        topic = np.bincount(t[t >= 0]).argmax() if (t >= 0).any() else -1
        u = np.unique(w)
        out[i, u] = 1
        np.add.at(out[i, V:2 * V], w, 1)
        out[i, 2 * V + u[world.topic_of[u] == topic]] = 1
        req = [v for v in x if world.is_harm[v]]
        out[i, -1] = float(bool(req) and req[0] in u)
    return torch.from_numpy(out)


class LinearRewardModel(torch.nn.Module):
    """$r_\\phi(x, y) = w^\\top\\phi(x, y)$ on `response_features` (no bias: only differences matter)."""

    def __init__(self, world):
        super().__init__()
        self.world = world
        self.lin = torch.nn.Linear(3 * world.vocab_size + 1, 1, bias=False)
        torch.nn.init.zeros_(self.lin.weight)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.lin(feats).squeeze(-1)

    @torch.no_grad()
    def score(self, prompts, responses) -> np.ndarray:
        return self(response_features(self.world, prompts, responses)).numpy().astype(float)


def fit_reward_model(world, prompts, ya, yb, a_preferred, steps: int = 300, lr: float = 0.05,
                     l2: float = 1e-3) -> LinearRewardModel:
    r"""Fit `LinearRewardModel` by full-batch Adam on the Bradley-Terry loss
    $-\log\sigma(r_\phi(y_w) - r_\phi(y_l)) + \ell_2\|w\|^2$ (`losses.bt_reward_loss`)."""
    rm = LinearRewardModel(world)
    fa, fb = response_features(world, prompts, ya), response_features(world, prompts, yb)
    a = torch.as_tensor(np.asarray(a_preferred), dtype=torch.bool)
    fw, fl = torch.where(a[:, None], fa, fb), torch.where(a[:, None], fb, fa)

    def loss_fn(m, step):
        return losses.bt_reward_loss(m(fw), m(fl)) + l2 * m.lin.weight.square().sum()

    base_train.fit(rm, loss_fn, steps, lr=lr, desc="reward model", progress=False)
    return rm.eval()


def rlhf_reinforce(policy, ref, world, reward_fn, steps: int, beta: float, *, prompts_per_step: int = 16,
                   group: int = 4, lr: float = 1e-3, seed: int = 0, prompt_fn=None) -> list[dict]:
    r"""RLHF with REINFORCE + RLOO (in place on `policy`): each step samples `group` responses for
    `prompts_per_step` fresh prompts, shapes $\tilde r = r - \beta(\log\pi(y) - \log\pi_{ref}(y))$
    (`losses.kl_penalised_rewards`), takes leave-one-out advantages and minimises `losses.pg_loss` (token-mean
    scaled). `reward_fn(prompts, responses) -> np.ndarray`; `prompt_fn(n, rng) -> Prompts` replaces the world's
    prompt sampler (e.g. `spurious_cue_prompts`). Returns per-step logs (reward, kl)."""
    g = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    logs = []
    for step in range(steps):
        p = world.sample_prompts(prompts_per_step, rng=g) if prompt_fn is None else prompt_fn(prompts_per_step, g)
        s = lm.sample(policy, p.ids, n=group, generator=gen, eos_id=world.eos_id,
                      max_new_tokens=world.config.max_resp_len + 1)
        r = torch.as_tensor(reward_fn(p.repeat(group), s["responses"]), dtype=torch.float32)
        policy.train()
        logp = lm.sequence_logps(policy, s)
        with torch.no_grad():
            logp_ref = lm.sequence_logps(ref, s)
        shaped = losses.kl_penalised_rewards(r, logp.detach(), logp_ref, beta)
        adv = losses.rloo_advantages(shaped, group)
        loss = losses.pg_loss(logp, adv)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        logs.append({"step": step, "reward": r.mean().item(), "kl": (logp.detach() - logp_ref).mean().item()})
    policy.eval()
    return logs


def rejection_sampling_sft(policy, world, reward_fn, n_prompts: int, n: int, steps: int, *, batch: int = 64,
                           lr: float = 1e-3, seed: int = 0) -> dict:
    r"""Best-of-`n` rejection sampling: draw `n` responses per prompt from `policy` itself (the reference),
    keep
    the argmax of `reward_fn`, then SFT `policy` on the kept pairs (in place). Returns the kept data and the
    number of reward-model calls ($n \times$ `n_prompts`)."""
    from .evaluation import best_of_n

    p = world.sample_prompts(n_prompts, seed=seed + 101)
    s = lm.sample(policy, p.ids, n=n, seed=seed + 102, eos_id=world.eos_id,
                  max_new_tokens=world.config.max_resp_len + 1)
    scores = reward_fn(p.repeat(n), s["responses"])
    best = best_of_n(s["responses"], scores, n)
    lm.sft(policy, p.ids, best, steps, batch, lr, world.pad_id, seed=seed)
    policy.eval()
    return {"prompts": p, "responses": best, "rm_calls": n * n_prompts}


def tilted_weights(rewards, beta: float, group: int) -> np.ndarray:
    r"""Self-normalised weights of $\pi^\*\propto\pi_{ref}\,e^{r/\beta}$ over `group` reference samples per
    prompt (rows grouped by prompt): $w_i = e^{r_i/\beta} / \sum_{j\in\text{group}} e^{r_j/\beta}$. Shape [N].
    The one-shot dual's tilt (`dual.tilted_weights`) with no safety term."""
    r = np.asarray(rewards, float).reshape(-1, group)
    return dual.tilted_weights(0.0, r, np.zeros_like(r), beta).reshape(-1)


def tilted_stats(weights, group: int, **values) -> dict:
    r"""`dual.weighted_stats` for flat arrays grouped by prompt (`group` rows each): expectations of each array
    in `values` under the tilted weights, and the KL $\sum_i w_i\log(k\,w_i)$ per prompt, averaged."""
    def rows(a):
        return np.asarray(a, float).reshape(-1, group)

    return dual.weighted_stats(rows(weights), **{k: rows(v) for k, v in values.items()})


def split_halves(world, responses) -> tuple[list, list]:
    """The first and second half of each response's words (first half rounded down), each ending in <eos>."""
    first, second = [], []
    for y in responses:
        w = world.response_words(y)
        h = len(w) // 2
        first.append([*w[:h], world.eos_id])
        second.append([*w[h:], world.eos_id])
    return first, second


def judge_scores(world, prompts, responses, judge: str = "gold") -> np.ndarray:
    """`gold` (the world's score), `weak` (gold score of the first half only: a partial view) or `decomposed`
    (gold score of each half, summed: task decomposition)."""
    if judge == "gold":
        return world.gold(prompts, responses)
    first, second = split_halves(world, responses)
    if judge == "weak":
        return world.gold(prompts, first)
    if judge == "decomposed":
        return world.gold(prompts, first) + world.gold(prompts, second)
    raise ValueError(f"judge must be 'gold', 'weak' or 'decomposed', got {judge!r}")


def spurious_cue_prompts(world, n: int, mode: str, *, cue_only: float = 0.0, cue_ids=None, rng=None,
                         seed=None):
    r"""`n` prompts carrying a spurious cue: the cue word of topic $k_c$ (`cue_ids[k_c]`, default the last word of
    each topic) is put just before `<sep>`. `mode`: "correlated" ($k_c$ = the prompt's topic), "decorrelated"
    ($k_c$ uniform over topics) or "shifted" ($k_c$ uniform over the OTHER topics). On a fraction `cue_only` of
    the prompts the prompt's own topic words are removed, so the cue is its only hint of the topic. Labels
    (`topic`, `harmful`, `request`) are unchanged: the gold score still reads the prompt's topic. The same
    `seed` gives the same base prompts and the same `cue_only` rows in every mode."""
    if mode not in ("correlated", "decorrelated", "shifted"):
        raise ValueError(f"mode must be 'correlated', 'decorrelated' or 'shifted', got {mode!r}")
    g = world.rng(rng, seed)
    T = world.config.n_topics
    cue_ids = [int(ids[-1]) for ids in world.topic_ids] if cue_ids is None else [int(c) for c in cue_ids]
    p = world.sample_prompts(n, rng=g)
    only = g.random(n) < cue_only
    off = g.integers(0, T, n) if mode == "decorrelated" else g.integers(1, T, n) if T > 1 else np.zeros(n, int)
    k_c = off if mode == "decorrelated" else (p.topic + (off if mode == "shifted" else 0)) % T
    ids = []
    for x, k, o in zip(p.ids, k_c, only):
        body = [t for t in x[4:-1] if world.topic_of[t] < 0] if o else x[4:-1]
        ids.append([*x[:4], *body, cue_ids[k], x[-1]])
    return type(p)(ids, p.topic, p.harmful, p.request)
