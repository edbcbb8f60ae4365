"""Outcome advantages, overlong reward shaping and DAPO's group filter (FIPO_SPEC §2).

Shapes: B samples; `group_index` [B] int64 in [0, num_groups) says which prompt each sample answers.
Everything is vectorised over groups (scatter-adds), no Python loop over samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AdvantageConfig:
    """Group-normalised outcome advantages.

    norm_by_std: divide by the group's std (GRPO); False subtracts the mean only (Dr.GRPO).
    eps: added to the std before dividing (verl: 1e-6).
    """

    norm_by_std: bool = True
    eps: float = 1e-6


def _group_stats(values: torch.Tensor, group_index: torch.Tensor, valid: torch.Tensor | None):
    """Per-group (count, mean, unbiased std) over valid samples, float64, each [num_groups]."""
    if values.shape != group_index.shape or values.dim() != 1:
        raise ValueError(f"values {tuple(values.shape)} and group_index {tuple(group_index.shape)} must be [B]")
    group_index = group_index.long()
    x = values.double()
    w = torch.ones_like(x) if valid is None else valid.double()
    num_groups = int(group_index.max().item()) + 1 if group_index.numel() else 0
    count = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_index, w)
    total = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_index, w * x)
    mean = total / count.clamp(min=1)
    sq = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_index, w * (x - mean[group_index]) ** 2)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    return count, mean, std


def grpo_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    norm_by_std: bool = True,
    eps: float = 1e-6,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """GRPO outcome advantage per sample: (R − mean_group) / (std_group + eps), std with Bessel's correction.

    Args:
        rewards: [B] float, the (shaped) scalar reward of each sample.
        group_index: [B] int64, the prompt group of each sample.
        norm_by_std: False gives Dr.GRPO (mean subtracted only).
        eps: added to the std.
        valid: optional [B] bool; invalid samples (e.g. reward timeouts) neither enter their group's
            statistics nor get an advantage (0).
    Returns:
        [B] float32. A group of one (one valid sample) uses mean 0 and std 1 (verl), so Â = R.
    """
    count, mean, std = (s[group_index] for s in _group_stats(rewards, group_index, valid))
    singleton = count <= 1
    mean = torch.where(singleton, 0.0, mean)
    std = torch.where(singleton, 1.0, std)
    adv = rewards.double() - mean
    if norm_by_std:
        adv = adv / (std + eps)
    if valid is not None:
        adv = torch.where(valid.bool(), adv, 0.0)
    return adv.float()


def drgrpo_advantages(rewards, group_index, norm_by_std: bool = False, eps: float = 1e-6, valid=None):
    """Dr.GRPO: group mean subtracted, no std normalisation. Same arguments as `grpo_advantages`."""
    return grpo_advantages(rewards, group_index, norm_by_std=False, eps=eps, valid=valid)


def broadcast_to_tokens(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[B] sequence advantages → [B, T] float32 per token, 0 where response_mask is False."""
    return advantages.float().unsqueeze(-1) * response_mask.float()


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (FIPO_SPEC §2.2 item 5), added to the correctness score.

    0 for |y| ≤ max_length − buffer, then −(|y| − (max_length − buffer)) / buffer · factor, reaching
    −factor at |y| = max_length (as verl computes it; no extra cap beyond, since responses are truncated at
    max_length).

    Args:
        lengths: [B] int, response lengths in tokens.
        max_length: L_max, the rollout's max response length.
        buffer: L_cache, the length of the penalty ramp (0 < buffer ≤ max_length).
        factor: the penalty at max_length.
    Returns: [B] float32, ≤ 0.
    """
    if not 0 < buffer <= max_length:
        raise ValueError(f"overlong buffer must be in (0, max_length={max_length}], got {buffer}")
    expected = max_length - buffer
    exceed = (lengths.double() - expected).clamp(min=0)
    return (-exceed / buffer * factor).float()


def filter_groups(correct: torch.Tensor, group_index: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """DAPO dynamic sampling: keep the groups whose correctness varies (FIPO_SPEC §2.2 item 4).

    The metric is correctness (acc), not the shaped reward: an all-correct group whose rewards differ by
    overlong penalties is still dropped. Groups of one sample are kept (their std is undefined;
    verl keeps them).

    Args:
        correct: [B] bool (or 0/1 float), the verifier's verdict.
        group_index: [B] int64.
        valid: optional [B] bool; invalid samples (reward timeout/error) are ignored in the statistic and
            never kept.
    Returns: [B] bool keep mask (whole groups).
    """
    count, _, std = (s[group_index] for s in _group_stats(correct.double(), group_index, valid))
    keep = (std > 0) | (count == 1)
    if valid is not None:
        keep = keep & valid.bool()
    return keep


def group_outcomes(correct: torch.Tensor, group_index: torch.Tensor) -> dict[str, int]:
    """Counts of groups by outcome (dynamic-sampling drop reasons): all_correct, all_wrong, mixed."""
    count, mean, _ = _group_stats(correct.double(), group_index, None)
    present = count > 0
    return {
        "all_correct": int((present & (mean == 1)).sum()),
        "all_wrong": int((present & (mean == 0)).sum()),
        "mixed": int((present & (mean > 0) & (mean < 1)).sum()),
    }
