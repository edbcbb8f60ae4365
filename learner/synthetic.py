"""Synthetic batches for the learner's tests and benchmarks: random tokens, lengths and advantages.

They have the exact layout rollout produces (left-padded prompts, right-padded responses), so everything
downstream of generation (log-probs, update, checkpoints, weight sync) can be exercised without an engine.
"""

from __future__ import annotations

import torch

from advantage import RolloutBatch


def random_batch(
    num_samples: int,
    *,
    vocab_size: int,
    prompt_len: tuple[int, int] = (4, 12),
    response_len: tuple[int, int] = (1, 24),
    group_size: int = 4,
    seed: int = 0,
) -> RolloutBatch:
    """A RolloutBatch of `num_samples` rows with random token ids in [0, vocab_size).

    Prompt and response lengths are uniform in the inclusive ranges `prompt_len` / `response_len`; rows
    [g·group_size, (g+1)·group_size) share group g and its prompt. Advantages are one standard-normal value
    per sample broadcast over its response (0 on padding); rollout log-probs are random negatives; rewards
    are the sign of the advantage. old_log_probs is left empty (the learner computes it).
    """
    if num_samples % group_size:
        raise ValueError(f"num_samples={num_samples} must be a multiple of group_size={group_size}")
    gen = torch.Generator().manual_seed(seed)
    num_groups = num_samples // group_size
    p_max, t_max = prompt_len[1], response_len[1]
    prompt_ids = torch.zeros(num_samples, p_max, dtype=torch.int64)
    prompt_mask = torch.zeros(num_samples, p_max, dtype=torch.bool)
    for g in range(num_groups):
        n = int(torch.randint(prompt_len[0], prompt_len[1] + 1, (1,), generator=gen))
        tokens = torch.randint(0, vocab_size, (n,), generator=gen)
        rows = slice(g * group_size, (g + 1) * group_size)
        prompt_ids[rows, p_max - n :] = tokens
        prompt_mask[rows, p_max - n :] = True
    lengths = torch.randint(response_len[0], response_len[1] + 1, (num_samples,), generator=gen)
    response_mask = torch.arange(t_max).unsqueeze(0) < lengths.unsqueeze(1)
    response_ids = torch.randint(0, vocab_size, (num_samples, t_max), generator=gen) * response_mask
    advantages = torch.randn(num_samples, generator=gen)
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        rollout_log_probs=-torch.rand(num_samples, t_max, generator=gen) * response_mask,
        group_index=torch.arange(num_groups).repeat_interleave(group_size),
        rewards=advantages.sign(),
        advantages=advantages.unsqueeze(1) * response_mask,
    )
