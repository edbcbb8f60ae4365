"""Registries that configs choose from by name: policy losses, advantage estimators, sample filters.

Each name is looked up once, at build time; a duplicate registration raises, and an unknown name raises an
error that lists the valid ones. Every entry of a registry has the same signature:

* POLICY_LOSSES: `fn(log_probs, old_log_probs, advantages, response_mask, config, *, ref_log_probs=None,
  normalizer=None) -> (loss, metrics)`; each entry carries its config class and default config
  (the algorithm's published values).
* ADVANTAGE_ESTIMATORS: `fn(rewards [B], group_index [B], norm_by_std, eps, valid=None) -> [B]`.
* SAMPLE_FILTERS: `fn(correct [B], group_index [B], valid=None) -> keep [B] bool`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

from advantage.estimators import drgrpo_advantages, filter_groups, grpo_advantages
from advantage.losses import FIPOLossConfig, PPOLossConfig, fipo_policy_loss, ppo_policy_loss

T = TypeVar("T")


class Registry(Generic[T]):
    """A name → entry map that refuses duplicates and explains unknown names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; valid names: {sorted(self._entries)}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries


@dataclass(frozen=True)
class PolicyLoss:
    """A registered policy loss: the function, its config class and the algorithm's default config."""

    name: str
    fn: Callable[..., Any]
    default_config: Any

    def make_config(self, **overrides: Any) -> Any:
        """The default config with `overrides` applied (unknown keys raise TypeError naming them)."""
        return replace(self.default_config, **overrides)


POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")
ADVANTAGE_ESTIMATORS: Registry[Callable[..., Any]] = Registry("advantage estimator")
SAMPLE_FILTERS: Registry[Callable[..., Any]] = Registry("sample filter")

# FIPO: the official 32B recipe (FIPO_SPEC §5.1).
POLICY_LOSSES.register("fipo", PolicyLoss("fipo", fipo_policy_loss, FIPOLossConfig()))
# DAPO: decoupled clip 0.2/0.28, dual-clip c = 10, token-mean, no KL (FIPO_SPEC §2.2).
POLICY_LOSSES.register("dapo", PolicyLoss("dapo", ppo_policy_loss, PPOLossConfig()))
# GRPO (DeepSeekMath): symmetric clip 0.2, no dual-clip, per-sequence token-mean,
# k3 KL to the reference with β = 1e-3.
POLICY_LOSSES.register(
    "grpo",
    PolicyLoss(
        "grpo",
        ppo_policy_loss,
        PPOLossConfig(clip_low=0.2, clip_high=0.2, clip_c=None, loss_agg_mode="seq-mean-token-mean", kl_coef=1e-3),
    ),
)

ADVANTAGE_ESTIMATORS.register("grpo", grpo_advantages)
ADVANTAGE_ESTIMATORS.register("drgrpo", drgrpo_advantages)

SAMPLE_FILTERS.register("correctness_varies", filter_groups)
