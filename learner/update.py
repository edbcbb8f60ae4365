"""One optimizer step on one mini-batch: forward → policy loss → backward per micro-batch, then clip and step.

Loss normalisation and gradient reduction. The policy loss of a micro-batch is Σ(per-token loss) / N where N
is the GLOBAL count of the mini-batch (`advantage.loss_normalizer` over all its rows; every rank holds the
whole batch, so every rank computes N on the host without communication), so the mini-batch gradient is the
SUM of the micro-batch gradients over micro-batches and ranks. Micro-batch gradients accumulate by summation
in `.grad`; FSDP2 reduce-scatters the rank gradients with an AVERAGE (divides by world_size), so each
backward is taken of `loss · world_size`. The result is independent of the micro-batch split and of the world
size (tested).

Host syncs: none per micro-batch (inputs arrive on the device once per mini-batch, token counts are host
ints from the plan, metrics accumulate as device tensors). Per mini-batch: two all_reduces of the stacked
metrics (sums; mins and maxes together) and ONE device → host copy of those plus the gradient norm, which
also decides whether the optimizer steps (a non-finite norm, or a mini-batch without loss tokens, skips it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from learner.batching import MicroBatchInputs, MicroBatchLossInputs

# Metrics the policy losses return that are partial sums under a global normaliser (summed over
# micro-batches and ranks); "*_min" / "*_max" reduce with min / max; all others are token-weighted means.
SUM_METRICS = ("loss", "pg_loss", "kl_loss", "dropped_seqs")


class MetricAccumulator:
    """The loss metrics of a rank's micro-batches as device tensors, reduced over ranks once per mini-batch."""

    def __init__(self, device: torch.device) -> None:
        self.zero = torch.zeros((), dtype=torch.float32, device=device)
        self.sums: dict[str, torch.Tensor] = {}
        self.mins: dict[str, torch.Tensor] = {}
        self.maxs: dict[str, torch.Tensor] = {}
        self.entropy_sum = self.zero.clone()

    def add(self, loss_metrics: dict[str, torch.Tensor], entropy_sum: torch.Tensor, num_tokens: int) -> None:
        """Fold in one micro-batch: the loss's metrics (means over its `num_tokens` loss tokens, a host int)
        and the sum of its tokens' entropies."""
        self.entropy_sum = self.entropy_sum + entropy_sum
        for key, value in loss_metrics.items():
            value = value.to(self.zero.device, torch.float32)
            if key in SUM_METRICS:
                self.sums[key] = self.sums.get(key, self.zero) + value
            elif key.endswith("_min"):  # keys appear on every rank (collectives below), values only with tokens
                low = self.mins.get(key, self.zero + math.inf)
                self.mins[key] = torch.minimum(low, value) if num_tokens else low
            elif key.endswith("_max"):
                high = self.maxs.get(key, self.zero - math.inf)
                self.maxs[key] = torch.maximum(high, value) if num_tokens else high
            else:  # a mean over the micro-batch's tokens: weight it by them
                self.sums[key] = self.sums.get(key, self.zero) + value * num_tokens

    def reduce(self, grad_norm: torch.Tensor, num_loss_tokens: int) -> dict[str, float]:
        """All ranks' metrics (two all_reduces, one host copy): learner/<key> for every loss metric,
        learner/entropy and learner/grad_norm. `num_loss_tokens`: the mini-batch's global count (host)."""
        sum_keys, min_keys, max_keys = sorted(self.sums), sorted(self.mins), sorted(self.maxs)
        summed = torch.stack([self.sums[k] for k in sum_keys] + [self.entropy_sum])
        dist.all_reduce(summed)
        extremes = torch.stack([-self.mins[k] for k in min_keys] + [self.maxs[k] for k in max_keys] + [self.zero])
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
        values = torch.cat([summed, extremes, grad_norm.reshape(1).float()]).tolist()  # the one host sync
        denominator = max(num_loss_tokens, 1)
        metrics: dict[str, float] = {}
        for key, value in zip(sum_keys, values):
            metrics[f"learner/{key}"] = value if key in SUM_METRICS else value / denominator
        metrics["learner/entropy"] = values[len(sum_keys)] / denominator
        extremes_host = values[len(sum_keys) + 1 : -2]
        for key, value in zip(min_keys + max_keys, extremes_host):
            value = -value if key in self.mins else value
            metrics[f"learner/{key}"] = value if math.isfinite(value) else 0.0
        metrics["learner/grad_norm"] = values[-1]
        return metrics


@dataclass(frozen=True)
class MiniBatchWork:
    """What one optimizer step needs, prepared by the worker: this rank's micro-batches on the device and the
    mini-batch's global counts (host ints, the same on every rank)."""

    inputs: list[MicroBatchInputs]
    loss_inputs: list[MicroBatchLossInputs]
    normalizer: torch.Tensor
    """0-d float32 on the device: the loss's global denominator (`advantage.loss_normalizer` of the mini-batch)."""
    num_loss_tokens: int
    has_loss: bool
    """False when the normalizer is 0 (no token in the loss): the step is skipped."""


def backward_micro_batches(
    model: torch.nn.Module, work: MiniBatchWork, *, policy_loss, loss_config, world_size: int, chunk_tokens: int
) -> MetricAccumulator:
    """Forward, loss and backward of every micro-batch of `work`, gradients summed in `.grad` (the caller zeroes
    them first); returns the micro-batches' metrics, not yet reduced over ranks."""
    acc = MetricAccumulator(work.normalizer.device)
    for inputs, loss_inputs in zip(work.inputs, work.loss_inputs):
        log_probs, entropy = model.response_log_probs(inputs, chunk_tokens=chunk_tokens, with_entropy=True)
        loss, loss_metrics = policy_loss.fn(
            log_probs,
            loss_inputs.old_log_probs,
            loss_inputs.advantages,
            loss_inputs.loss_mask,
            loss_config,
            ref_log_probs=loss_inputs.ref_log_probs,
            normalizer=work.normalizer,
        )
        # FSDP2 averages gradients over ranks; the loss is already globally normalised, so ×world_size turns
        # that average into the sum (see the module docstring).
        (loss * world_size).backward()
        entropy_sum = torch.where(loss_inputs.loss_mask, entropy, 0.0).sum()
        acc.add(loss_metrics, entropy_sum, loss_inputs.num_loss_tokens)
        del log_probs, entropy, loss
    return acc


def clip_gradients(model: torch.nn.Module, grad_clip: float | None) -> torch.Tensor:
    """Clip the global gradient norm to `grad_clip` (None: no clipping); returns the norm before clipping (a
    0-d device tensor, the full norm over all ranks)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(
        model.parameters(), max_norm=math.inf if grad_clip is None else grad_clip
    )
    return grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm


def train_mini_batch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    work: MiniBatchWork,
    *,
    policy_loss,
    loss_config,
    world_size: int,
    grad_clip: float | None,
    lr: float,
    chunk_tokens: int,
) -> tuple[dict[str, float], bool]:
    """Forward, loss and backward of every micro-batch of `work`, then clip and (unless skipped) one AdamW step
    at learning rate `lr`. Returns (metrics, stepped); metrics as `MetricAccumulator.reduce`."""
    optimizer.zero_grad(set_to_none=True)
    acc = backward_micro_batches(
        model, work, policy_loss=policy_loss, loss_config=loss_config, world_size=world_size, chunk_tokens=chunk_tokens
    )
    metrics = acc.reduce(clip_gradients(model, grad_clip), work.num_loss_tokens)
    stepped = math.isfinite(metrics["learner/grad_norm"]) and work.has_loss
    if stepped:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return metrics, stepped
