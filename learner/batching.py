"""How a step's batch is cut for the update: mini-batches → ranks → micro-batches, and a micro-batch's inputs.

Pure functions of the batch shape and masks (no model, no process group), so every rank computes the whole
plan for every rank and they all agree without talking:

* mini-batches: consecutive blocks of `mini_batch_samples` rows, in batch order (no shuffle, one epoch);
* ranks: mini-batch rows [r·s, (r+1)·s) go to rank r (s = mini_batch_samples / world_size);
* micro-batches: consecutive rows of a rank's share, packed greedily while rows × (longest prompt + longest
  response) stays within `micro_batch_tokens` (a sample longer than the budget is a micro-batch of its own).
  FSDP runs one all-gather per layer per forward, so all ranks must run the same number of micro-batches:
  ranks that packed fewer split their largest micro-batch in two until they have as many as the rank with
  the most (each share has s ≥ that many rows, so this always ends).

`compute_log_probs` and `update` both use this plan and `micro_batch_inputs`, so a row is always computed in
the same micro-batch with the same padding: the old log-probs are bitwise the training forward's at θ = θ_old.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from advantage import REWARD_OK, RolloutBatch


def response_lengths(response_mask: torch.Tensor) -> torch.Tensor:
    """[B] int64: 1 + the index of the last True of each row of `response_mask` [B, T] (0 for an empty row)."""
    positions = torch.arange(1, response_mask.shape[-1] + 1, device=response_mask.device)
    return (response_mask.bool() * positions).amax(-1) if response_mask.shape[-1] else response_mask.sum(-1)


def loss_mask(batch: RolloutBatch) -> torch.Tensor:
    """[B, T] bool: response tokens that enter the loss (samples whose reward is not OK leave it)."""
    mask = batch.response_mask.bool()
    if batch.reward_status is not None:
        mask = mask & (batch.reward_status == REWARD_OK).unsqueeze(-1)
    return mask


def _padded_tokens(prompt_len: torch.Tensor, resp_len: torch.Tensor, rows: range) -> int:
    return len(rows) * int(prompt_len[rows.start : rows.stop].max() + resp_len[rows.start : rows.stop].max())


def _pack_greedy(prompt_len: torch.Tensor, resp_len: torch.Tensor, rows: range, budget: int) -> list[range]:
    """Consecutive runs of `rows` whose padded size fits `budget` (a run of one row may exceed it)."""
    parts: list[range] = []
    start = rows.start
    for end in range(rows.start + 1, rows.stop + 1):
        if end - start > 1 and _padded_tokens(prompt_len, resp_len, range(start, end)) > budget:
            parts.append(range(start, end - 1))
            start = end - 1
    parts.append(range(start, rows.stop))
    return parts


def _split_to(prompt_len: torch.Tensor, resp_len: torch.Tensor, parts: list[range], count: int) -> list[range]:
    """Split the largest multi-row part in two (at its middle) until there are `count` parts."""
    parts = list(parts)
    while len(parts) < count:
        splittable = [i for i, p in enumerate(parts) if len(p) > 1]
        i = max(splittable, key=lambda j: (_padded_tokens(prompt_len, resp_len, parts[j]), -j))
        p = parts[i]
        mid = p.start + len(p) // 2
        parts[i : i + 1] = [range(p.start, mid), range(mid, p.stop)]
    return parts


def plan_micro_batches(
    prompt_mask: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    mini_batch_samples: int,
    micro_batch_tokens: int,
    world_size: int,
    rank: int,
) -> list[list[range]]:
    """This rank's micro-batches of every mini-batch, as row ranges of the step's batch.

    Args:
        prompt_mask: [B, P] bool, True on real prompt tokens (left padding False).
        response_mask: [B, T] bool, True on response tokens (right padding False).
    Returns: one list per mini-batch (in order) of this rank's micro-batches (row ranges, in order); every
        rank gets the same number of micro-batches in each mini-batch.
    """
    num_samples = prompt_mask.shape[0]
    if num_samples % mini_batch_samples:
        raise ValueError(
            f"the batch of {num_samples} samples does not divide into mini-batches of mini_batch_samples="
            f"{mini_batch_samples}"
        )
    if mini_batch_samples % world_size:
        raise ValueError(
            f"mini_batch_samples={mini_batch_samples} does not divide evenly over world_size={world_size} ranks"
        )
    prompt_len = prompt_mask.bool().sum(-1).cpu()
    resp_len = response_lengths(response_mask).cpu()
    share = mini_batch_samples // world_size
    plan = []
    for mb_start in range(0, num_samples, mini_batch_samples):
        per_rank = [
            _pack_greedy(prompt_len, resp_len, range(start, start + share), micro_batch_tokens)
            for start in range(mb_start, mb_start + mini_batch_samples, share)
        ]
        count = max(len(parts) for parts in per_rank)
        plan.append(_split_to(prompt_len, resp_len, per_rank[rank], count))
    return plan


@dataclass(frozen=True)
class MicroBatchInputs:
    """Model inputs of one micro-batch of b rows, padding trimmed to the micro-batch's longest sample.

    input_ids:      [b, p + t] int64, [left-padded prompt | right-padded response].
    attention_mask: [b, p + t] int64, 1 on real tokens.
    position_ids:   [b, p + t] int64, 0-based positions counted over real tokens (so left padding is harmless).
    response_ids:   [b, t] int64, the response tokens whose log-probs are wanted.
    rows:           the micro-batch's rows of the step's batch.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_ids: torch.Tensor
    rows: range

    @property
    def response_len(self) -> int:
        """t: padded response length of this micro-batch."""
        return self.response_ids.shape[1]

    @property
    def num_tokens(self) -> int:
        """Real (attended) tokens in the micro-batch."""
        return int(self.attention_mask.sum())


def micro_batch_inputs(batch: RolloutBatch, rows: range, device: torch.device | str = "cpu") -> MicroBatchInputs:
    """The model inputs of rows `rows` of `batch` (see MicroBatchInputs), on `device`."""
    sl = slice(rows.start, rows.stop)
    prompt_mask = batch.prompt_mask[sl].bool()
    p = max(1, int(prompt_mask.sum(-1).max()))
    resp_len = response_lengths(batch.response_mask[sl])
    t = max(1, int(resp_len.max()))
    prompt_ids = batch.prompt_ids[sl, -p:]
    response_ids = batch.response_ids[sl, :t]
    response_attn = torch.arange(t).unsqueeze(0) < resp_len.unsqueeze(-1)
    attention_mask = torch.cat([prompt_mask[:, -p:], response_attn], dim=1).long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return MicroBatchInputs(
        input_ids=torch.cat([prompt_ids, response_ids], dim=1).to(device),
        attention_mask=attention_mask.to(device),
        position_ids=position_ids.to(device),
        response_ids=response_ids.to(device),
        rows=rows,
    )
