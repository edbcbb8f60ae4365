"""The phases of one training step, each one call from the loop in orchestration/train.py."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import ray

from advantage import RolloutBatch
from orchestration import stacks
from orchestration.builders import Run
from orchestration.data import PromptRow
from orchestration.evaluate import eval_metrics, evaluate_rows
from orchestration.sampling import GroupPool, group_samples


class StageError(RuntimeError):
    """A phase of a step failed or ran past its deadline; the message names the phase and the step."""


def is_timeout(err: BaseException | None) -> bool:
    """True when `err` (or its cause chain) says a deadline passed."""
    while err is not None:
        if isinstance(err, (TimeoutError, ray.exceptions.GetTimeoutError)) or any(
            phrase in str(err) for phrase in ("timed out", "did not finish within", "no result within")
        ):
            return True
        err = err.__cause__
    return False


@contextmanager
def stage(name: str, step: int, timings: dict[str, float], stack_dir: str | None = None) -> Iterator[None]:
    """Time a phase into timings["timing_s/<name>"]; re-raise any failure as StageError naming it. When the
    failure is a missed deadline, the message carries the stacks of the workers running project code."""
    start = time.perf_counter()
    try:
        yield
    except Exception as err:
        message = (
            f"step {step}: stage '{name}' failed after {time.perf_counter() - start:.1f} s: {type(err).__name__}: {err}"
        )
        if stack_dir is not None and is_timeout(err):
            message += f"\nstacks of the workers (dumps in {stack_dir}):\n{stacks.collect(stack_dir)}"
        raise StageError(message) from err
    timings[f"timing_s/{name}"] = time.perf_counter() - start


def sampling_seed(seed: int, step: int, gen_round: int) -> int:
    """A distinct base seed per (run seed, step, round); sample seeds are base + prompt·n + i."""
    return ((seed * 1_000_003 + step) * 64 + gen_round) * 10_000_000


def score(run: Run, rows: Sequence[PromptRow], samples: Sequence[Any]):
    """Reward every sample against its prompt's ground truth."""
    return run.reward.score_batch(
        [s.text for s in samples],
        [rows[s.prompt_index].ground_truth for s in samples],
        [rows[s.prompt_index].extra for s in samples],
    )


def collect_batch(run: Run, step: int) -> tuple[RolloutBatch, dict[str, float]]:
    """Generation rounds with dynamic sampling until the step's batch is full (or an error after max rounds)."""
    a = run.cfg.algorithm
    pool = GroupPool(run.sizes.train_batch_prompts, run.sample_filter)
    rounds = a.max_gen_rounds if run.sample_filter is not None else 1
    for gen_round in range(rounds):
        rows = [run.train_rows[i] for i in run.sampler.next_indices(run.sizes.gen_batch_prompts)]
        samples = run.rollout.generate(
            [list(r.messages) for r in rows], run.sampling(sampling_seed(run.cfg.seed, step, gen_round))
        )
        pool.add(group_samples(rows, samples, score(run, rows, samples)))
        if pool.full():
            return pool.to_batch(run.rollout.pad_token_id, run.shaping), pool.metrics()
    raise RuntimeError(
        f"dynamic sampling kept {len(pool.kept)} of the {run.sizes.train_batch_prompts} groups a step needs after "
        f"algorithm.max_gen_rounds={rounds} rounds ({dict(pool.drops)} dropped): the task is too easy or too hard "
        "for the model; raise algorithm.max_gen_rounds or algorithm.gen_batch_prompts"
    )


def compute_advantages(run: Run, batch: RolloutBatch) -> tuple[RolloutBatch, dict[str, Any]]:
    return ray.get(run.advantage.compute.remote(batch), timeout=600)


def learner_metrics(per_mini_batch: Sequence[dict[str, float]]) -> dict[str, float]:
    """The learner's per-mini-batch metrics (already prefixed learner/ or perf/) reduced over the step: mean,
    min of *_min keys, max of *_max keys; plus FIPO's weight statistics of the last mini-batch alone under
    learner/last_mini_batch/ (the first mini-batch always has weights ≡ 1, which dilutes the mean)."""
    out: dict[str, float] = {}
    for key in per_mini_batch[0]:
        values = [m[key] for m in per_mini_batch if key in m]
        if key.endswith("_min"):
            out[key] = min(values)
        elif key.endswith("_max"):
            out[key] = max(values)
        else:
            out[key] = sum(values) / len(values)
    for key, value in per_mini_batch[-1].items():
        name = key.split("/", 1)[-1]
        if name.startswith(("influence_weights", "future_kl")):
            out[f"learner/last_mini_batch/{name}"] = value
    return out


def evaluate(run: Run, rows: Sequence[PromptRow], step: int) -> dict[str, float]:
    """avg@k / cons@k / pass@k of the current rollout weights on `rows` (k = trainer.eval_samples), through
    orchestration.evaluate.evaluate_rows, the function the evaluation CLI uses too."""
    sampling = run.sampling(sampling_seed(run.cfg.seed, step, 63), evaluation=True)
    return eval_metrics(evaluate_rows(run.rollout, run.reward, rows, sampling))
