"""DAPO dynamic sampling: collect scored groups over generation rounds until a training batch is full.

`GroupPool` takes each round's samples and rewards, keeps the groups the sample filter accepts (by default
those whose correctness varies), counts drops by reason, and turns the first `target_prompts` kept groups into
one `RolloutBatch` (rewards = score + overlong penalty; correct; reward_status). Running out of rounds is the
caller's error to raise (orchestration.steps.collect_batch), never a silent partial batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from advantage import REWARD_ERROR, REWARD_OK, REWARD_TIMEOUT, RolloutBatch, overlong_penalty
from orchestration.data.prompts import PromptRow
from reward.result import RewardResult
from rollout.types import Sample, samples_to_batch

STATUS_CODES = {"ok": REWARD_OK, "timeout": REWARD_TIMEOUT, "error": REWARD_ERROR}


class SamplingError(RuntimeError):
    """Dynamic sampling could not fill a step's batch within algorithm.max_gen_rounds generation rounds: too few
    groups had mixed rewards (the task is too easy or too hard for the model by now). A condition of the run, not
    a bug: its message names the step, what was kept and dropped, and the keys that change it."""


@dataclass
class ScoredGroup:
    """One prompt's samples with their verdicts."""

    row: PromptRow
    samples: list[Sample]
    results: list[RewardResult]


@dataclass(frozen=True)
class OverlongShaping:
    """DAPO's soft overlong penalty: buffer_tokens = 0 disables it."""

    max_response_tokens: int
    buffer_tokens: int
    factor: float = 1.0


def group_samples(rows: Sequence[PromptRow], samples: Sequence[Sample], results: Sequence[RewardResult]):
    """Split a round's flat, prompt-ordered samples into ScoredGroups (one per row)."""
    if len(samples) != len(results):
        raise ValueError(f"{len(samples)} samples but {len(results)} reward results")
    by_prompt: dict[int, ScoredGroup] = {}
    for sample, result in zip(samples, results):
        if not 0 <= sample.prompt_index < len(rows):
            raise ValueError(f"sample answers prompt {sample.prompt_index}, but the round had {len(rows)} prompts")
        group = by_prompt.setdefault(sample.prompt_index, ScoredGroup(rows[sample.prompt_index], [], []))
        group.samples.append(sample)
        group.results.append(result)
    return [by_prompt[i] for i in sorted(by_prompt)]


class GroupPool:
    """Accumulates kept groups across generation rounds.

    target_prompts: groups needed for one training step.
    sample_filter:  fn(correct [B] bool, group_index [B], valid [B] bool) -> keep [B] bool, or None to keep
                    every group (GRPO). Groups with no valid (status ok) sample are always dropped.
    """

    def __init__(self, target_prompts: int, sample_filter: Callable | None) -> None:
        self.target_prompts = target_prompts
        self.sample_filter = sample_filter
        self.kept: list[ScoredGroup] = []
        self.rounds = 0
        self.seen_groups = 0
        self.drops: Counter[str] = Counter()

    def add(self, groups: Sequence[ScoredGroup]) -> None:
        self.rounds += 1
        self.seen_groups += len(groups)
        if not groups:
            return
        correct = torch.tensor([r.correct for g in groups for r in g.results], dtype=torch.bool)
        valid = torch.tensor([r.status == "ok" for g in groups for r in g.results], dtype=torch.bool)
        index = torch.tensor([i for i, g in enumerate(groups) for _ in g.results], dtype=torch.int64)
        if self.sample_filter is None:
            keep = valid.clone()
        else:
            keep = self.sample_filter(correct, index, valid)
        start = 0
        for group in groups:
            n = len(group.results)
            group_valid, group_correct = valid[start : start + n], correct[start : start + n]
            if bool(keep[start : start + n].any()):
                self.kept.append(group)
            elif not bool(group_valid.any()):
                self.drops["no_valid_reward"] += 1
            elif bool(group_correct[group_valid].all()):
                self.drops["all_correct"] += 1
            elif not bool(group_correct[group_valid].any()):
                self.drops["all_wrong"] += 1
            else:
                self.drops["filtered"] += 1
            start += n

    def full(self) -> bool:
        return len(self.kept) >= self.target_prompts

    def to_batch(self, pad_token_id: int, shaping: OverlongShaping | None) -> RolloutBatch:
        """The first target_prompts kept groups as one batch (surplus groups are discarded, as in DAPO)."""
        if not self.full():
            raise RuntimeError(f"only {len(self.kept)} of {self.target_prompts} groups were collected")
        groups = self.kept[: self.target_prompts]
        samples = [dataclasses.replace(s, prompt_index=g) for g, group in enumerate(groups) for s in group.samples]
        results = [r for group in groups for r in group.results]
        batch = samples_to_batch(samples, pad_token_id)
        scores = torch.tensor([r.score for r in results], dtype=torch.float32)
        status = torch.tensor([STATUS_CODES[r.status] for r in results], dtype=torch.int8)
        rewards = scores
        if shaping is not None and shaping.buffer_tokens > 0:
            penalty = overlong_penalty(
                batch.response_lengths, shaping.max_response_tokens, shaping.buffer_tokens, shaping.factor
            )
            rewards = torch.where(status == REWARD_OK, scores + penalty, scores)
        return batch.replace(
            rewards=rewards,
            correct=torch.tensor([r.correct for r in results], dtype=torch.bool),
            reward_status=status,
        )

    def metrics(self) -> dict[str, float]:
        """dynamic_filter/ metrics: rounds, kept fraction and drops by reason."""
        out = {
            "dynamic_filter/gen_rounds": float(self.rounds),
            "dynamic_filter/groups_seen": float(self.seen_groups),
            "dynamic_filter/kept_frac": len(self.kept) / max(self.seen_groups, 1),
        }
        for reason in ("all_correct", "all_wrong", "no_valid_reward", "filtered"):
            out[f"dynamic_filter/drop_{reason}"] = float(self.drops[reason])
        out["dynamic_filter/surplus_groups"] = float(max(0, len(self.kept) - self.target_prompts))
        return out


class RoundSizer:
    """How many prompts a generation round draws: enough for the groups still missing at the running keep-rate
    of dynamic sampling, instead of a fixed `gen_batch_prompts` (DAPO's recipe, which generates up to twice
    what it keeps when most groups carry signal).

    round size = ceil(missing groups / keep-rate × margin), between the missing count and `max_prompts`; the
    keep-rate is kept / seen over the rounds of the last `window` steps; with no history yet (the run's first
    round), `max_prompts`. Deterministic: a function of earlier rounds' outcomes only, which the checkpoint
    keeps (`state_dict`).

    max_prompts: the largest round (algorithm.gen_batch_prompts).
    margin:      safety factor over the expected need (algorithm.gen_round_margin), >= 1.
    window:      steps of history in the keep-rate estimate.
    """

    def __init__(self, max_prompts: int, margin: float, window: int = 4) -> None:
        if max_prompts < 1 or margin < 1 or window < 1:
            raise ValueError(
                f"RoundSizer needs max_prompts >= 1, margin >= 1, window >= 1; got {max_prompts}, {margin}, {window}"
            )
        self.max_prompts, self.margin, self.window = max_prompts, margin, window
        self.history: list[tuple[int, int]] = []  # (kept, seen) per step, newest last

    def keep_rate(self) -> float | None:
        seen = sum(s for _, s in self.history)
        return sum(k for k, _ in self.history) / seen if seen else None

    def size(self, missing: int) -> int:
        """Prompts for the next round of a step that still needs `missing` groups."""
        rate = self.keep_rate()
        if rate is None:
            return self.max_prompts
        wanted = math.ceil(missing / max(rate, 1e-3) * self.margin)
        return max(1, min(self.max_prompts, max(missing, wanted)))

    def record(self, kept: int, seen: int) -> None:
        """A finished step's totals over its rounds (kept counts every kept group, surplus included)."""
        self.history = [*self.history, (kept, seen)][-self.window :]

    def state_dict(self) -> dict:
        return {"history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.history = [tuple(h) for h in state.get("history", [])]
