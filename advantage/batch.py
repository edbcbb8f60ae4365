"""The one batch type that moves through the system (rollout → reward → advantage → learner).

All tensors live on the CPU between stages and move through the Ray object store. Shapes use
B = samples in the batch, P = padded prompt length, T = padded response length.

Padding convention (so that `cat([prompt_ids, response_ids], 1)` is one contiguous sequence per row):
prompts are LEFT-padded (`prompt_mask` marks real tokens), responses are RIGHT-padded (`response_mask`).
Every log-prob, advantage and reward is float32.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

# reward_status codes: a sample whose reward is not OK leaves the loss (it is not scored as wrong).
REWARD_OK, REWARD_TIMEOUT, REWARD_ERROR = 0, 1, 2
REWARD_STATUS_NAMES = ("ok", "timeout", "error")


@dataclass(frozen=True)
class RolloutBatch:
    """A padded batch of B = num_groups * group_size sampled responses.

    prompt_ids:        [B, P] int64, left-padded prompt tokens.
    prompt_mask:       [B, P] bool, True on real prompt tokens.
    response_ids:      [B, T] int64, right-padded response tokens (EOS included when the sample stopped).
    response_mask:     [B, T] bool, True where a token counts in the loss (real response tokens).
    rollout_log_probs: [B, T] float32, log-prob of each sampled token under the rollout engine (0 on padding).
    group_index:       [B] int64 in [0, num_groups): which prompt each response answers.
    policy_version:    the learner weights version that generated the batch.
    rewards:           [B] float32, shaped reward (score + overlong penalty), or None before scoring.
    correct:           [B] bool, the verifier's verdict (dynamic sampling filters on this, not on rewards).
    reward_status:     [B] int8, REWARD_OK / REWARD_TIMEOUT / REWARD_ERROR.
    old_log_probs:     [B, T] float32, the learner's recomputation before the update (π_old in the loss).
    ref_log_probs:     [B, T] float32, reference-policy log-probs (only when a KL-to-reference term is on).
    advantages:        [B, T] float32, advantage broadcast over the response, 0 where response_mask is False.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    rollout_log_probs: torch.Tensor
    group_index: torch.Tensor
    policy_version: int = 0
    rewards: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    reward_status: torch.Tensor | None = None
    old_log_probs: torch.Tensor | None = None
    ref_log_probs: torch.Tensor | None = None
    advantages: torch.Tensor | None = None

    def __post_init__(self) -> None:
        b, t = self.response_ids.shape
        if self.prompt_ids.shape[0] != b or self.prompt_mask.shape != self.prompt_ids.shape:
            raise ValueError(
                f"RolloutBatch: prompt_ids {tuple(self.prompt_ids.shape)} / prompt_mask "
                f"{tuple(self.prompt_mask.shape)} do not match {b} responses"
            )
        for name in ("response_mask", "rollout_log_probs", "old_log_probs", "ref_log_probs", "advantages"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (b, t):
                raise ValueError(f"RolloutBatch.{name} has shape {tuple(value.shape)}, expected {(b, t)}")
        for name in ("group_index", "rewards", "correct", "reward_status"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (b,):
                raise ValueError(f"RolloutBatch.{name} has shape {tuple(value.shape)}, expected {(b,)}")

    @property
    def num_samples(self) -> int:
        return self.response_ids.shape[0]

    @property
    def response_lengths(self) -> torch.Tensor:
        """[B] int64, number of real response tokens per sample."""
        return self.response_mask.sum(-1)

    def replace(self, **changes) -> RolloutBatch:
        """A copy with some fields replaced (e.g. `batch.replace(old_log_probs=lp)`)."""
        return dataclasses.replace(self, **changes)

    def select(self, index: torch.Tensor | slice) -> RolloutBatch:
        """The rows `index` (a slice, an int64 index tensor or a bool mask over B) as a new batch."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value[index] if isinstance(value, torch.Tensor) else value
        return RolloutBatch(**out)

    def split(self, num_chunks: int) -> list[RolloutBatch]:
        """Split into `num_chunks` contiguous equal parts (B must divide evenly)."""
        if num_chunks <= 0 or self.num_samples % num_chunks:
            raise ValueError(f"cannot split a batch of {self.num_samples} samples into {num_chunks} equal parts")
        size = self.num_samples // num_chunks
        return [self.select(slice(i * size, (i + 1) * size)) for i in range(num_chunks)]

    def to(self, device: torch.device | str) -> RolloutBatch:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return RolloutBatch(**out)
