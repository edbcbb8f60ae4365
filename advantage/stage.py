"""The advantage stage: a scored batch with old log-probs → per-token advantages and mismatch metrics.

Pure tensor code over a RolloutBatch (advantage/group.py's AdvantageService is the thin Ray shell around it).
Samples whose reward status is not OK get no advantage and leave the loss (their response_mask is cleared).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from advantage.batch import REWARD_OK, RolloutBatch
from advantage.estimators import broadcast_to_tokens
from advantage.losses import masked_mean
from advantage.registry import ADVANTAGE_ESTIMATORS


@dataclass(frozen=True)
class AdvantageStageConfig:
    """norm_by_std / eps: passed to the estimator (GRPO: True / 1e-6; Dr.GRPO ignores norm_by_std).

    rollout_is_cap: truncated importance sampling of the gap between the behaviour policy (the engine that
        sampled, `rollout_log_probs`) and π_old (the learner's recomputation): each token's advantage is
        multiplied by w = min(π_old / π_rollout, cap), w detached (token-level TIS, as verl's rollout
        correction). For the clipped surrogates here this equals multiplying the per-token policy loss by w,
        since w > 0 factors out of min / max. None = off (the default, as in verl and the official recipes).
    """

    norm_by_std: bool = True
    eps: float = 1e-6
    rollout_is_cap: float | None = None

    def __post_init__(self) -> None:
        if self.rollout_is_cap is not None and not self.rollout_is_cap > 0:
            raise ValueError(f"rollout_is_cap must be > 0 or None, got {self.rollout_is_cap}")


def masked_quantiles(values: torch.Tensor, mask: torch.Tensor, qs: tuple[float, ...]) -> torch.Tensor:
    """[len(qs)] quantiles of `values` over the True entries of `mask` (zeros when there are none)."""
    picked = values[mask].float()
    if picked.numel() == 0:
        return torch.zeros(len(qs))
    return torch.quantile(picked, torch.tensor(qs, dtype=torch.float32))


def compute_advantages(
    batch: RolloutBatch, estimator: Callable, config: AdvantageStageConfig
) -> tuple[RolloutBatch, dict[str, torch.Tensor]]:
    """Fill `advantages` [B, T] (float32, 0 off the mask) and clear the mask of non-OK samples.

    Metrics: advantage statistics, and the rollout-vs-learner log-prob mismatch over valid tokens when
    old_log_probs are present: mean/max |log π_rollout − log π_old|, the k1 / k3 estimates of
    KL(π_rollout ‖ π_old), quantiles of the ratio π_old / π_rollout, and with `rollout_is_cap` the mean
    importance weight and the share of tokens the cap truncates (the advantages then carry the weights).
    """
    if batch.rewards is None or batch.reward_status is None:
        raise ValueError("compute_advantages needs a scored batch (rewards and reward_status)")
    valid = batch.reward_status == REWARD_OK
    scalar = estimator(batch.rewards, batch.group_index, config.norm_by_std, config.eps, valid=valid)
    mask = batch.response_mask & valid.unsqueeze(-1)
    advantages = broadcast_to_tokens(scalar, mask)
    metrics = {
        "advantage/mean": masked_mean(advantages, mask),
        "advantage/abs_mean": masked_mean(advantages.abs(), mask),
        "advantage/max": scalar[valid].max() if bool(valid.any()) else torch.zeros(()),
        "advantage/min": scalar[valid].min() if bool(valid.any()) else torch.zeros(()),
    }
    if batch.old_log_probs is not None:
        diff = batch.rollout_log_probs - batch.old_log_probs  # log π_rollout − log π_old
        ratio = torch.exp(-diff)  # π_old / π_rollout
        p05, p50, p95 = masked_quantiles(ratio, mask, (0.05, 0.5, 0.95))
        metrics.update(
            {
                "mismatch/abs_log_prob_diff_mean": masked_mean(diff.abs(), mask),
                "mismatch/abs_log_prob_diff_max": torch.where(mask, diff.abs(), 0.0).max(),
                "mismatch/kl_k1": masked_mean(diff, mask),
                "mismatch/kl_k3": masked_mean(ratio + diff - 1.0, mask),
                "mismatch/ratio_p05": p05,
                "mismatch/ratio_p50": p50,
                "mismatch/ratio_p95": p95,
                "mismatch/ratio_max": torch.where(mask, ratio, 0.0).max(),
            }
        )
        if config.rollout_is_cap is not None:
            weights = ratio.clamp(max=config.rollout_is_cap)
            advantages = torch.where(mask, advantages * weights, 0.0)
            metrics["mismatch/is_weight_mean"] = masked_mean(weights, mask)
            metrics["mismatch/is_truncated_frac"] = masked_mean((ratio > config.rollout_is_cap).float(), mask)
    return batch.replace(advantages=advantages, response_mask=mask), metrics


class AdvantageWorker:
    """The plain body of the advantage actor (advantage/group.py): an estimator and its settings, for batches."""

    def __init__(self, estimator_name: str, config: AdvantageStageConfig) -> None:
        self.estimator = ADVANTAGE_ESTIMATORS.get(estimator_name)
        self.config = config

    def compute(self, batch: RolloutBatch) -> tuple[RolloutBatch, dict[str, torch.Tensor]]:
        return compute_advantages(batch, self.estimator, self.config)
