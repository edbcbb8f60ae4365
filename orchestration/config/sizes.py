"""Derived batch sizes: computed once from the config, checked, printed and logged; nothing recomputes them.

Units are in the names: `*_prompts` count prompts (groups), `*_samples` count responses
(prompts × group_size), `*_tokens` count tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from orchestration.config.errors import ConfigError


@dataclass(frozen=True)
class DerivedSizes:
    """The schedule of one training step, derived from the config (see `derive_sizes`)."""

    group_size: int
    train_batch_prompts: int
    train_batch_samples: int
    gen_batch_prompts: int
    gen_batch_samples: int
    mini_batch_prompts: int
    mini_batch_samples: int
    mini_batches_per_step: int
    learner_world_size: int
    mini_batch_samples_per_rank: int
    micro_batch_tokens: int
    max_sequence_tokens: int
    rollout_workers: int

    def describe(self) -> str:
        """One line a person reads at start-up."""
        return (
            f"1 step = {self.train_batch_prompts} prompts × {self.group_size} = {self.train_batch_samples} samples "
            f"→ {self.mini_batches_per_step} optimizer step(s) of {self.mini_batch_samples} samples "
            f"({self.mini_batch_samples_per_rank} per learner rank × {self.learner_world_size}); "
            f"generation rounds of {self.gen_batch_prompts} prompts × {self.group_size} over "
            f"{self.rollout_workers} rollout worker(s); micro-batches ≤ {self.micro_batch_tokens} tokens "
            f"(longest sequence {self.max_sequence_tokens} tokens)"
        )

    def as_dict(self) -> dict:
        return asdict(self)


def derive_sizes(
    *,
    policy_loss: str,
    group_size: int,
    train_batch_prompts: int,
    gen_batch_prompts: int,
    mini_batch_prompts: int,
    learner_world_size: int,
    micro_batch_tokens: int,
    max_prompt_tokens: int,
    max_response_tokens: int,
    rollout_workers: int,
    filter_groups: bool = True,
) -> DerivedSizes:
    """Check the batch-size knobs against each other and derive the step schedule.

    Raises ConfigError naming the offending keys: sizes that are not positive or don't divide, a mini-batch
    larger than the train batch, a generation round smaller than the train batch, a micro-batch budget smaller
    than one sequence, and FIPO with a single mini-batch per step (θ = θ_old on every update, so FIPO would
    silently equal DAPO; FIPO_SPEC §4).
    Without dynamic sampling (`filter_groups` false) every group is kept, so a generation round is exactly the
    train batch, whatever gen_batch_prompts says.
    """
    positives = {
        "algorithm.group_size": group_size,
        "algorithm.train_batch_prompts": train_batch_prompts,
        "algorithm.gen_batch_prompts": gen_batch_prompts,
        "algorithm.mini_batch_prompts": mini_batch_prompts,
        "learner.world_size": learner_world_size,
        "learner.micro_batch_tokens": micro_batch_tokens,
        "data.max_prompt_tokens": max_prompt_tokens,
        "rollout.max_response_tokens": max_response_tokens,
        "rollout.num_workers": rollout_workers,
    }
    for key, value in positives.items():
        if not (isinstance(value, int) and value > 0):
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    if mini_batch_prompts > train_batch_prompts:
        raise ConfigError(
            f"algorithm.mini_batch_prompts={mini_batch_prompts} is larger than "
            f"algorithm.train_batch_prompts={train_batch_prompts} (a mini-batch is a part of a step's batch)"
        )
    if train_batch_prompts % mini_batch_prompts:
        raise ConfigError(
            f"algorithm.train_batch_prompts={train_batch_prompts} is not a multiple of "
            f"algorithm.mini_batch_prompts={mini_batch_prompts}"
        )
    mini_batch_samples = mini_batch_prompts * group_size
    if mini_batch_samples % learner_world_size:
        raise ConfigError(
            f"a mini-batch of algorithm.mini_batch_prompts × algorithm.group_size = {mini_batch_samples} samples "
            f"does not split evenly over learner.world_size={learner_world_size} ranks"
        )
    if gen_batch_prompts < train_batch_prompts:
        raise ConfigError(
            f"algorithm.gen_batch_prompts={gen_batch_prompts} must be >= "
            f"algorithm.train_batch_prompts={train_batch_prompts} (one generation round must be able to fill a step)"
        )
    max_sequence_tokens = max_prompt_tokens + max_response_tokens
    if micro_batch_tokens < max_sequence_tokens:
        raise ConfigError(
            f"learner.micro_batch_tokens={micro_batch_tokens} is smaller than one sequence "
            f"(data.max_prompt_tokens + rollout.max_response_tokens = {max_sequence_tokens})"
        )
    mini_batches = train_batch_prompts // mini_batch_prompts
    gen_prompts = gen_batch_prompts if filter_groups else train_batch_prompts
    if policy_loss == "fipo" and mini_batches < 2:
        raise ConfigError(
            f"FIPO with one mini-batch per step (algorithm.train_batch_prompts={train_batch_prompts}, "
            f"algorithm.mini_batch_prompts={mini_batch_prompts}) equals DAPO exactly: the future-KL is computed "
            "from π_θ − π_old, which is 0 on the first mini-batch of every step. Use at least 2 mini-batches "
            "(the official recipe uses 8)."
        )
    return DerivedSizes(
        group_size=group_size,
        train_batch_prompts=train_batch_prompts,
        train_batch_samples=train_batch_prompts * group_size,
        gen_batch_prompts=gen_prompts,
        gen_batch_samples=gen_prompts * group_size,
        mini_batch_prompts=mini_batch_prompts,
        mini_batch_samples=mini_batch_samples,
        mini_batches_per_step=mini_batches,
        learner_world_size=learner_world_size,
        mini_batch_samples_per_rank=mini_batch_samples // learner_world_size,
        micro_batch_tokens=micro_batch_tokens,
        max_sequence_tokens=max_sequence_tokens,
        rollout_workers=rollout_workers,
    )
