"""An independent, deliberately naive float64 reference of FIPO_SPEC §3 and §2, in plain Python.

Written from the spec's formulas with per-token loops and the `math` module only (no torch, no code shared
with advantage/), so that tests compare the vectorised float32 implementation against it.
"""

from __future__ import annotations

import math


def future_sum(values, gamma, mask=None):
    """Inclusive discounted future sum of one sequence: F_t = Σ_{k≥t} γ^(k−t) m_k x_k."""
    out, acc = [0.0] * len(values), 0.0
    for t in range(len(values) - 1, -1, -1):
        acc = (values[t] if (mask is None or mask[t]) else 0.0) + gamma * acc
        out[t] = acc
    return out


def fipo_token_losses(
    logp,
    logp_old,
    adv,
    mask,
    *,
    clip_low=0.2,
    clip_high=0.28,
    c=10.0,
    tau=32.0,
    eps_f=0.2,
    high_only=True,
    safety=10.0,
):
    """Per-token FIPO loss of one sequence, its weights, and the number of dual-clipped negative tokens."""
    gamma = 2.0 ** (-1.0 / tau)
    delta = [max(-20.0, min(20.0, a - b)) for a, b in zip(logp, logp_old)]
    ratio = [math.exp(d) for d in delta]
    d_part = [d if (m and d <= math.log(c)) else 0.0 for d, m in zip(delta, mask)]
    fut = future_sum(d_part, gamma)
    weights, losses, n_dual = [], [], 0
    for t, f_t in enumerate(fut):
        if eps_f > 0:
            lo, hi = (1.0 if high_only else 1.0 - eps_f), 1.0 + eps_f
            raw = math.exp(f_t) if f_t < 700 else math.inf
            w = min(max(raw, lo), hi)
        else:
            raw = math.exp(f_t) if f_t < 700 else math.inf
            w = min(raw, 10.0)
        if adv[t] < 0 and ratio[t] > safety:
            w = min(max(w, 0.8), 1.0)
        weights.append(w)
        a = adv[t] * w
        u1 = -a * ratio[t]
        u2 = -a * min(max(ratio[t], 1 - clip_low), 1 + clip_high)
        u = max(u1, u2)
        u3 = -a * c
        if a < 0:
            if mask[t] and adv[t] < 0 and u > u3:
                n_dual += 1
            u = min(u, u3)
        losses.append(u)
    return losses, weights, fut, n_dual


def fipo_loss(logp, logp_old, adv, mask, drop_seq=True, **kw):
    """Token-mean FIPO loss over a batch (lists of sequences), with the official sequence drop."""
    total, count = 0.0, 0
    for lp, lo, a, m in zip(logp, logp_old, adv, mask):
        losses, _, _, n_dual = fipo_token_losses(lp, lo, a, m, **kw)
        if drop_seq and n_dual > 1:
            continue
        total += sum(x for x, mm in zip(losses, m) if mm)
        count += sum(1 for mm in m if mm)
    return total / max(count, 1)


def ppo_token_losses(logp, logp_old, adv, *, clip_low=0.2, clip_high=0.28, c=10.0):
    """Per-token PPO loss with decoupled clip and dual-clip (c=None: no dual-clip)."""
    out = []
    for a, b, A in zip(logp, logp_old, adv):
        r = math.exp(max(-20.0, min(20.0, a - b)))
        u = max(-A * r, -A * min(max(r, 1 - clip_low), 1 + clip_high))
        if c is not None and A < 0:
            u = min(u, -A * c)
        out.append(u)
    return out


def aggregate(token_losses, mask, mode, horizon=None):
    """verl's aggregation modes over lists of per-token losses."""
    seqs = [[x for x, m in zip(row, mr) if m] for row, mr in zip(token_losses, mask)]
    if mode == "token-mean":
        n = sum(len(s) for s in seqs)
        return sum(sum(s) for s in seqs) / max(n, 1)
    nonempty = [s for s in seqs if s]
    if mode == "seq-mean-token-mean":
        return sum(sum(s) / len(s) for s in nonempty) / max(len(nonempty), 1)
    if mode == "seq-mean-token-sum":
        return sum(sum(s) for s in nonempty) / max(len(nonempty), 1)
    horizon = len(token_losses[0]) if horizon is None else horizon
    return sum(sum(s) for s in nonempty) / (max(len(nonempty), 1) * horizon)


def grpo(rewards, groups, norm_by_std=True, eps=1e-6):
    by_group = {}
    for r, g in zip(rewards, groups):
        by_group.setdefault(g, []).append(r)
    out = []
    for r, g in zip(rewards, groups):
        rs = by_group[g]
        if len(rs) == 1:
            mu, sd = 0.0, 1.0
        else:
            mu = sum(rs) / len(rs)
            sd = math.sqrt(sum((x - mu) ** 2 for x in rs) / (len(rs) - 1))
        out.append((r - mu) / (sd + eps) if norm_by_std else r - mu)
    return out
