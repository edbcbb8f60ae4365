"""Pure tensor math of FIPO, DAPO and GRPO: advantages, overlong shaping, group filter, future-KL weights,
policy losses and loss aggregation. No Ray, no models, no config objects: tensors in, tensors out."""

from advantage.batch import REWARD_ERROR, REWARD_OK, REWARD_STATUS_NAMES, REWARD_TIMEOUT, RolloutBatch
from advantage.estimators import (
    AdvantageConfig,
    broadcast_to_tokens,
    drgrpo_advantages,
    filter_groups,
    group_outcomes,
    grpo_advantages,
    overlong_penalty,
)
from advantage.future_sum import discounted_future_sum, gamma_from_decay_rate
from advantage.losses import (
    LOSS_AGG_MODES,
    FIPOLossConfig,
    PPOLossConfig,
    aggregate_loss,
    fipo_policy_loss,
    influence_weights,
    kl_penalty,
    loss_normalizer,
    masked_mean,
    ppo_policy_loss,
)
from advantage.registry import ADVANTAGE_ESTIMATORS, POLICY_LOSSES, SAMPLE_FILTERS, PolicyLoss, Registry

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "LOSS_AGG_MODES",
    "POLICY_LOSSES",
    "REWARD_ERROR",
    "REWARD_OK",
    "REWARD_STATUS_NAMES",
    "REWARD_TIMEOUT",
    "SAMPLE_FILTERS",
    "AdvantageConfig",
    "FIPOLossConfig",
    "PPOLossConfig",
    "PolicyLoss",
    "Registry",
    "RolloutBatch",
    "aggregate_loss",
    "broadcast_to_tokens",
    "discounted_future_sum",
    "drgrpo_advantages",
    "filter_groups",
    "fipo_policy_loss",
    "gamma_from_decay_rate",
    "group_outcomes",
    "grpo_advantages",
    "influence_weights",
    "kl_penalty",
    "loss_normalizer",
    "masked_mean",
    "overlong_penalty",
    "ppo_policy_loss",
]
