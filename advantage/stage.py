"""The advantage stage: a scored batch with old log-probs → per-token advantages and mismatch metrics.

Pure tensor code over a RolloutBatch (the Ray AdvantageActor in orchestration is a thin shell around it).
Samples whose reward status is not OK get no advantage and leave the loss (their response_mask is cleared).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from advantage.batch import REWARD_OK, RolloutBatch
from advantage.estimators import broadcast_to_tokens
from advantage.losses import masked_mean


@dataclass(frozen=True)
class AdvantageStageConfig:
    """norm_by_std / eps: passed to the estimator (GRPO: True / 1e-6; Dr.GRPO ignores norm_by_std)."""

    norm_by_std: bool = True
    eps: float = 1e-6


def compute_advantages(
    batch: RolloutBatch, estimator: Callable, config: AdvantageStageConfig
) -> tuple[RolloutBatch, dict[str, torch.Tensor]]:
    """Fill `advantages` [B, T] (float32, 0 off the mask) and clear the mask of non-OK samples.

    Metrics: advantage statistics, and the rollout-vs-learner log-prob mismatch over valid tokens
    (mean/max |log π_rollout − log π_old| and the k1 / k3 KL estimates of KL(π_rollout ‖ π_old)), when
    old_log_probs are present.
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
        metrics.update(
            {
                "mismatch/abs_log_prob_diff_mean": masked_mean(diff.abs(), mask),
                "mismatch/abs_log_prob_diff_max": torch.where(mask, diff.abs(), 0.0).max(),
                "mismatch/kl_k1": masked_mean(diff, mask),
                "mismatch/kl_k3": masked_mean(torch.exp(-diff) + diff - 1.0, mask),
            }
        )
    return batch.replace(advantages=advantages, response_mask=mask), metrics


class AdvantageWorker:
    """The plain body of the AdvantageActor: a chosen estimator and its settings, applied to batches."""

    def __init__(self, estimator_name: str, config: AdvantageStageConfig) -> None:
        from advantage.registry import ADVANTAGE_ESTIMATORS

        self.estimator = ADVANTAGE_ESTIMATORS.get(estimator_name)
        self.config = config

    def compute(self, batch: RolloutBatch) -> tuple[RolloutBatch, dict[str, torch.Tensor]]:
        return compute_advantages(batch, self.estimator, self.config)
