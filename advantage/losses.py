"""Policy losses (PPO with decoupled clip and dual-clip = DAPO's loss; GRPO's; FIPO's) and loss aggregation.

Every loss takes per-token tensors [B, T] and its own small frozen config, and returns `(loss, metrics)`:
`loss` is a 0-d tensor with grad; `metrics` maps names to detached 0-d float32 tensors (means over the valid
tokens of this call; no host syncs here). Shapes: B responses, T padded response length. `response_mask` is
[B, T] bool (or 0/1), True on tokens that count in the loss.

Normalisation. A loss is `sum(per-token loss) / normalizer`. Without `normalizer` it is the local count
(tokens for token-mean, sequences for the seq-mean modes): verl's per-micro-batch mean. The learner passes the
global count of the whole mini-batch (over all micro-batches and ranks; see `loss_normalizer`), so that the
summed gradients of any micro-batch / rank split equal the gradient of the whole mini-batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from advantage.future_sum import discounted_future_sum, gamma_from_decay_rate

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")
LOG_RATIO_CLAMP = 20.0  # official code clamps log π_θ − log π_old to [−20, 20] before exp (FIPO_SPEC §3.1)


def _check_agg_mode(mode: str) -> None:
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {mode!r}")


@dataclass(frozen=True)
class PPOLossConfig:
    """PPO clipped surrogate with decoupled clip range and dual-clip. DAPO: (0.2, 0.28, c=10, token-mean).

    clip_low:  ε_low; the ratio is clipped below at 1 − clip_low.
    clip_high: ε_high; the ratio is clipped above at 1 + clip_high (DAPO's clip-higher: 0.28).
    clip_c:    dual-clip bound c (> 1): for Â < 0 the per-token loss is capped at c·|Â|. None disables it.
    loss_agg_mode: one of LOSS_AGG_MODES.
    kl_coef:   β of a KL-to-reference penalty added to the loss (GRPO); 0 disables it (needs ref_log_probs).
    kl_estimator: "k1" (log-ratio), "k2" (½·log-ratio²), "k3" / "low_var_kl" (Schulman's low-variance k3).
    """

    clip_low: float = 0.2
    clip_high: float = 0.28
    clip_c: float | None = 10.0
    loss_agg_mode: str = "token-mean"
    kl_coef: float = 0.0
    kl_estimator: str = "low_var_kl"

    def __post_init__(self) -> None:
        if not 0 <= self.clip_low < 1:
            raise ValueError(f"clip_low must be in [0, 1), got {self.clip_low}")
        if not self.clip_high >= 0:
            raise ValueError(f"clip_high must be >= 0, got {self.clip_high}")
        if self.clip_c is not None and not self.clip_c > 1 + self.clip_high:
            raise ValueError(f"clip_c must be > 1 + clip_high = {1 + self.clip_high}, got {self.clip_c}")
        _check_agg_mode(self.loss_agg_mode)
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")


@dataclass(frozen=True)
class FIPOLossConfig:
    """FIPO's loss (FIPO_SPEC §3); defaults are the official 32B recipe.

    clip_low, clip_high: ε_low / ε_high of the PPO clip (0.2 / 0.28).
    clip_c: dual-clip bound c, also the participation filter: tokens with ratio > c leave every future-KL sum.
    decay_rate: τ, the half-life of the future-KL discount in tokens (γ = 2^(−1/τ)); 32 in both recipes.
    weight_clip: ε_f. Influence weights are clipped to [1 − ε_f, 1 + ε_f] (or [1, 1 + ε_f], see below).
        0 selects the official "no clip" mode: weights are capped at 10 with no lower bound.
    weight_clip_high_only: clip weights to [1, 1 + ε_f] (32B recipe) instead of [1 − ε_f, 1 + ε_f] (7B).
    safety_threshold: for tokens with Â < 0 and ratio > this, the weight is clamped to [0.8, 1.0]
        (32B recipe: 10; 7B: 3).
    drop_seq_on_dual_clip: drop a whole sequence from the loss when it has two or more negative-advantage
        tokens whose dual-clip bound is active (official code only).
    loss_agg_mode: one of LOSS_AGG_MODES (the official recipe: token-mean).
    """

    clip_low: float = 0.2
    clip_high: float = 0.28
    clip_c: float = 10.0
    decay_rate: float = 32.0
    weight_clip: float = 0.2
    weight_clip_high_only: bool = True
    safety_threshold: float = 10.0
    drop_seq_on_dual_clip: bool = True
    loss_agg_mode: str = "token-mean"

    def __post_init__(self) -> None:
        PPOLossConfig(self.clip_low, self.clip_high, self.clip_c, self.loss_agg_mode)  # shared checks
        gamma_from_decay_rate(self.decay_rate)  # raises on decay_rate <= 0
        if not 0 <= self.weight_clip < 1:
            raise ValueError(f"weight_clip must be in [0, 1) (0 = official cap-at-10 mode), got {self.weight_clip}")
        if not self.safety_threshold > 0:
            raise ValueError(f"safety_threshold must be > 0, got {self.safety_threshold}")

    @property
    def gamma(self) -> float:
        return gamma_from_decay_rate(self.decay_rate)


# ----------------------------------------------------------------------------------------------------------
# Aggregation


def loss_normalizer(response_mask: torch.Tensor, loss_agg_mode: str) -> torch.Tensor:
    """The local denominator of `aggregate_loss` for this mask: 0-d float32.

    token-mean: number of valid tokens. seq-mean-*: number of sequences with at least one valid token.
    Sum it over every micro-batch and rank of a mini-batch to get the global normalizer.
    """
    _check_agg_mode(loss_agg_mode)
    mask = response_mask.bool()
    if loss_agg_mode == "token-mean":
        return mask.sum().to(torch.float32)
    return mask.any(-1).sum().to(torch.float32)


def aggregate_loss(
    loss_mat: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str,
    normalizer: float | torch.Tensor | None = None,
    horizon: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar.

    token-mean:              Σ_i Σ_t ℓ_it / N_tokens
    seq-mean-token-mean:     Σ_i (Σ_t ℓ_it / |o_i|) / N_seqs
    seq-mean-token-sum:      Σ_i Σ_t ℓ_it / N_seqs
    seq-mean-token-sum-norm: Σ_i Σ_t ℓ_it / (N_seqs · horizon)   (Dr.GRPO; horizon defaults to T)

    N_* is `normalizer` when given (a global count), else the local count (`loss_normalizer`). A zero count
    gives a zero loss, not NaN.
    """
    _check_agg_mode(loss_agg_mode)
    mask = response_mask.to(loss_mat.dtype)
    if normalizer is None:
        normalizer = loss_normalizer(response_mask, loss_agg_mode)
    denom = torch.as_tensor(normalizer, dtype=loss_mat.dtype, device=loss_mat.device).clamp(min=1.0)
    masked = loss_mat * mask
    if loss_agg_mode == "token-mean":
        return masked.sum() / denom
    if loss_agg_mode == "seq-mean-token-mean":
        per_seq = masked.sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_seq.sum() / denom
    if loss_agg_mode == "seq-mean-token-sum":
        return masked.sum() / denom
    horizon = loss_mat.shape[-1] if horizon is None else horizon
    return masked.sum() / (denom * horizon)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over positions where `mask` is True (0 when there are none). Detached float32."""
    mask = mask.bool()
    total = torch.where(mask, values.detach().float(), 0.0).sum()
    return total / mask.sum().clamp(min=1).float()


def kl_penalty(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, estimator: str = "low_var_kl") -> torch.Tensor:
    """Per-token KL(π_θ || π_ref) estimate [B, T] from sampled-token log-probs.

    k1: log π_θ − log π_ref.   k2: ½ (log π_θ − log π_ref)².
    k3 / low_var_kl: r − log r − 1 with r = π_ref / π_θ (non-negative, unbiased); the log-ratio is clamped
    to [−20, 20] and the result to [−10, 10] as verl does.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    diff = log_probs - ref_log_probs
    if estimator == "k1":
        return diff
    if estimator == "k2":
        return 0.5 * diff.square()
    log_r = (-diff).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (torch.exp(log_r) - log_r - 1.0).clamp(-10.0, 10.0)


# ----------------------------------------------------------------------------------------------------------
# PPO / DAPO / GRPO


def _clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float, clip_c: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO loss with decoupled clip and optional dual-clip.

    Returns (loss [B, T], clipped [B, T] bool: the clipped branch is active,
    dual_clipped [B, T] bool: Â < 0 and the dual-clip bound c·|Â| is active).
    """
    unclipped = -advantages * ratio
    clipped_branch = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped_branch)
    clipped = clipped_branch > unclipped
    if clip_c is None:
        return loss, clipped, torch.zeros_like(clipped)
    bound = -advantages * clip_c
    dual_clipped = (advantages < 0) & (loss > bound)
    loss = torch.where(advantages < 0, torch.minimum(loss, bound), loss)
    return loss, clipped, dual_clipped


def ppo_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    config: PPOLossConfig,
    *,
    ref_log_probs: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (DAPO: decoupled clip + dual-clip, token-mean; GRPO: symmetric clip + KL).

    Args:
        log_probs: [B, T] float32, log π_θ of the sampled tokens (with grad).
        old_log_probs: [B, T] float32, log π_old (no grad).
        advantages: [B, T] float32, advantages broadcast over each response.
        response_mask: [B, T] bool, True on tokens in the loss.
        config: PPOLossConfig.
        ref_log_probs: [B, T] float32, needed when config.kl_coef > 0.
        normalizer: global denominator (see module docstring); None = local.
    Returns: (loss 0-d, metrics).
    """
    mask = response_mask.bool()
    log_ratio = (log_probs - old_log_probs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    loss_mat, clipped, dual_clipped = _clipped_surrogate(
        ratio, advantages, config.clip_low, config.clip_high, config.clip_c
    )
    pg_loss = aggregate_loss(loss_mat, mask, config.loss_agg_mode, normalizer)
    metrics = {
        "pg_loss": pg_loss.detach(),
        "ppo_kl": masked_mean(-log_ratio, mask),
        "pg_clipfrac": masked_mean(clipped.float(), mask),
        "pg_clipfrac_lower": masked_mean(dual_clipped.float(), mask),
    }
    loss = pg_loss
    if config.kl_coef > 0:
        if ref_log_probs is None:
            raise ValueError("kl_coef > 0 needs ref_log_probs (a reference policy's log-probs)")
        kl = kl_penalty(log_probs, ref_log_probs, config.kl_estimator)
        kl_loss = aggregate_loss(kl, mask, config.loss_agg_mode, normalizer)
        loss = pg_loss + config.kl_coef * kl_loss
        metrics["kl_loss"] = kl_loss.detach()
    metrics["loss"] = loss.detach()
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------
# FIPO


def influence_weights(future_kl: torch.Tensor, config: FIPOLossConfig) -> torch.Tensor:
    """Clipped influence weights f = clip(exp(F)) [B, T] (FIPO_SPEC §3.4, before the safety rule).

    F is clamped to [log lo, log hi] before exp, which gives exactly the official exp-then-clamp result
    without ever producing inf (exp overflows float32 for F > 88.7; FIPO_SPEC §8.1).
    """
    if config.weight_clip > 0:
        hi = 1.0 + config.weight_clip
        lo = 1.0 if config.weight_clip_high_only else 1.0 - config.weight_clip
        return torch.exp(future_kl.clamp(math.log(lo), math.log(hi))).clamp(lo, hi)
    return torch.exp(future_kl.clamp(max=math.log(10.0))).clamp(max=10.0)  # official mode C: cap 10, no floor


def future_kl_weights(
    delta: torch.Tensor, response_mask: torch.Tensor, config: FIPOLossConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FIPO's per-token credit from Δ = clamp(log π_θ − log π_old, ±20) [B, T] float32 (no grad) and the
    response mask [B, T] bool (FIPO_SPEC §3.2-3.4): (participates [B, T] bool: response tokens with exp Δ ≤ c,
    future_kl F [B, T]: the discounted inclusive future sum of Δ over them, weights f = clip(exp F) [B, T]),
    before the advantage-dependent safety rule. The loss and the credit picture (tools/credit.py) both call it."""
    participates = response_mask & (delta <= math.log(config.clip_c))
    future_kl = discounted_future_sum(delta, config.gamma, participates)
    return participates, future_kl, influence_weights(future_kl, config)


def fipo_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    config: FIPOLossConfig,
    *,
    ref_log_probs: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """FIPO's policy loss, exactly as the official code computes it (FIPO_SPEC §3.1-3.8).

    Δ = clamp(log π_θ − log π_old, ±20); r = exp(Δ). Under no-grad on Δ.detach(): D = Δ · mask · [r ≤ c],
    F = discounted inclusive future sum of D with γ = 2^(−1/τ), f = clip(exp F), and for tokens with Â < 0
    and r > safety_threshold f is clamped to [0.8, 1]. The per-token loss is the dual-clipped PPO loss of
    Ã = Â·f; gradients flow through r only (f is a constant). Sequences with ≥ 2 dual-clipped negative
    tokens leave the loss when `drop_seq_on_dual_clip`.

    Args:
        log_probs: [B, T] float32, log π_θ of the sampled tokens, from the live forward pass (with grad).
        old_log_probs: [B, T] float32, log π_old recomputed by the learner before the update (no grad).
        advantages: [B, T] float32, outcome advantages broadcast over each response.
        response_mask: [B, T] bool, True on response tokens (padding False).
        config: FIPOLossConfig.
        ref_log_probs: unused (FIPO has no KL term); accepted so every registered loss has one signature.
        normalizer: global denominator (see module docstring). None: the local count of kept tokens
            (sequences), i.e. dropped sequences also leave the denominator, as in the official code. With a
            global normalizer a dropped sequence's tokens stay in the denominator (the drop is only known
            inside each micro-batch, after the normalizer was fixed).
    Returns: (loss 0-d, metrics) with the official metrics (influence-weight statistics, clip fractions,
        dual-clip fraction, negative-advantage ratio bands, ppo_kl, dropped sequences).
    """
    del ref_log_probs
    mask = response_mask.bool()
    log_ratio = (log_probs - old_log_probs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)

    with torch.no_grad():
        delta = log_ratio.detach()
        _, future_kl, weights = future_kl_weights(delta, mask, config)
        safety = (advantages < 0) & (ratio.detach() > config.safety_threshold)
        weights = torch.where(safety, weights.clamp(0.8, 1.0), weights)

    weighted_adv = advantages * weights
    loss_mat, clipped, dual_clipped = _clipped_surrogate(
        ratio, weighted_adv, config.clip_low, config.clip_high, config.clip_c
    )
    keep = mask
    dropped = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
    if config.drop_seq_on_dual_clip:
        dropped = (dual_clipped & mask).sum(-1) > 1
        keep = mask & ~dropped.unsqueeze(-1)
    loss = aggregate_loss(loss_mat, keep, config.loss_agg_mode, normalizer)

    with torch.no_grad():
        metrics = _fipo_metrics(delta, ratio.detach(), advantages, mask, future_kl, weights, config)
        metrics.update(
            loss=loss.detach(),
            pg_loss=loss.detach(),
            pg_clipfrac=masked_mean(clipped.float(), mask),
            pg_clipfrac_lower=masked_mean(dual_clipped.float(), mask),
            dropped_seqs=dropped.sum().float(),
            dropped_seq_frac=dropped.float().mean() if dropped.numel() else torch.zeros(()),
            safety_frac=masked_mean(safety.float(), mask),
        )
    return loss, metrics


def _fipo_metrics(
    delta: torch.Tensor,
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    future_kl: torch.Tensor,
    weights: torch.Tensor,
    config: FIPOLossConfig,
) -> dict[str, torch.Tensor]:
    """The diagnostics the official code logs, over valid tokens. Raw weights saturate at e^80 (no inf)."""
    any_valid = mask.any()
    raw = torch.exp(future_kl.double().clamp(max=80.0))  # float64: sums of e^80 overflow float32
    if config.weight_clip > 0:
        hi = 1.0 + config.weight_clip
        lo = 1.0 if config.weight_clip_high_only else 1.0 - config.weight_clip
    else:
        hi, lo = 10.0, 0.0
    neg = mask & (advantages < 0)

    def masked_max(x: torch.Tensor) -> torch.Tensor:  # 0 when nothing is valid; no host sync
        return torch.where(any_valid, torch.where(mask, x, -torch.finfo(x.dtype).max).max(), 0.0)

    def masked_min(x: torch.Tensor) -> torch.Tensor:
        return torch.where(any_valid, torch.where(mask, x, torch.finfo(x.dtype).max).min(), 0.0)

    return {
        "ppo_kl": masked_mean(-delta, mask),
        "future_kl_mean": masked_mean(future_kl, mask),
        "future_kl_min": masked_min(future_kl),
        "future_kl_max": masked_max(future_kl),
        "influence_weights_mean": masked_mean(weights, mask),
        "influence_weights_min": masked_min(weights),
        "influence_weights_max": masked_max(weights),
        "influence_weights_raw_mean": (torch.where(mask, raw, 0.0).sum() / mask.sum().clamp(min=1)).float(),
        "influence_weights_raw_min": masked_min(raw).float(),
        "influence_weights_raw_max": masked_max(raw).float(),
        "influence_weights_clipfrac_upper": masked_mean((raw > hi).float(), mask),
        "influence_weights_active_frac": masked_mean(((weights - 1.0).abs() > 0.01).float(), mask),
        "influence_weights_clipfrac_lower": masked_mean((raw < lo).float(), mask),
        "filtered_token_frac": masked_mean((delta > math.log(config.clip_c)).float(), mask),
        "neg_adv_ratio_2_3_frac": masked_mean(((ratio >= 2) & (ratio < 3)).float(), neg),
        "neg_adv_ratio_3_4_frac": masked_mean(((ratio >= 3) & (ratio < 4)).float(), neg),
        "neg_adv_ratio_4_c_frac": masked_mean(((ratio >= 4) & (ratio < config.clip_c)).float(), neg),
    }
