"""The phases of one training step, each one call from the loop in orchestration/train.py."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray

from advantage import RolloutBatch
from learner.group import LearnerRankError
from orchestration.checkpoint import CheckpointError, TrainerState
from orchestration.cluster import stacks
from orchestration.cluster.faults import say
from orchestration.cluster.layout import PlacementError
from orchestration.data.prompts import PromptRow
from orchestration.data.tasks import habit_stats
from orchestration.evaluation import eval_metrics, evaluate_rows, generate_rows, habit_records, score_rows
from orchestration.metrics import MetricsLogger
from orchestration.run import Run
from orchestration.sampling import GroupPool, SamplingError, group_samples


class PhaseError(RuntimeError):
    """A phase of a step failed or ran past its deadline; the message names the phase and the step."""

    def __init__(self, message: str, *, phase: str, step: int) -> None:
        super().__init__(message)
        self.phase, self.step = phase, step


def is_timeout(err: BaseException | None) -> bool:
    """True when `err` (or its cause chain) says a deadline passed."""
    phrases = ("timed out", "did not finish within", "no result within")
    return any(
        isinstance(e, (TimeoutError, ray.exceptions.GetTimeoutError)) or any(phrase in str(e) for phrase in phrases)
        for e in _causes(err)
    )


@contextmanager
def phase(name: str, step: int, timings: dict[str, float], stack_dir: str | None = None) -> Iterator[None]:
    """Time a phase into timings["timing_s/<name>"]; re-raise any failure as PhaseError naming it. When the
    failure is a missed deadline, the message carries the stacks of the workers running project code."""
    start = time.perf_counter()
    try:
        yield
    except Exception as err:
        message = (
            f"step {step}: phase '{name}' failed after {time.perf_counter() - start:.1f} s: {type(err).__name__}: {err}"
        )
        if stack_dir is not None and is_timeout(err):
            message += f"\nstacks of the workers (dumps in {stack_dir}):\n{stacks.collect(stack_dir)}"
        raise PhaseError(message, phase=name, step=step) from err
    timings[f"timing_s/{name}"] = time.perf_counter() - start


def restore(run: Run, path: Path | None, wandb_run_id: str | None = None) -> TrainerState:
    """The learner, the data order, the round sizer and any batch collected ahead as they were after the
    checkpoint (or snapshot) `path`, and its trainer state; None: the run's start (the learner as built, the
    first prompts, step 0, `wandb_run_id`)."""
    if path is None:
        run.sampler.load_state_dict(run.sampler.state_dict() | {"epoch": 0, "position": 0})
        state = TrainerState(wandb_run_id=wandb_run_id)
    else:
        state = run.ckpt.load(path, run.learner)
        run.sampler.load_state_dict(state.sampler)
    if run.round_sizer is not None:
        run.round_sizer.load_state_dict(state.extra.get("round_sizer", {}))
    if run.pipeline is not None:
        run.pipeline.load_state_dict(None if path is None else run.ckpt.pending(path))
    return state


def recover_learner(run: Run, err: PhaseError, logger: MetricsLogger, wandb_run_id: str | None) -> TrainerState:
    """After a failed phase: when the learner group failed (a rank raised or died, a call or a collective timed
    out), replace it by a new group, restore this run's newest checkpoint or snapshot (or the start) into it,
    push those weights to the engines and drop the metrics rows after it; returns the restored state, from
    which the loop replays (resume is exact, so the replayed steps are the same). Re-raises anything else, and
    raises RestartBudgetError when the step has failed more than trainer.max_restarts times."""
    if isinstance(err.__cause__, CheckpointError):  # the storage cannot take a checkpoint (a full disk): a replay
        raise err  # would fail the same way; the run stops, its older checkpoints intact
    error: BaseException = err
    lost_at, attempts = time.monotonic(), 0
    while True:
        if run.learner.failed is None and lost_objects(error):  # objects lost with a node (the weight buckets
            try:  # of a push, or those resent to a restarted engine): the learner may have been on it; ask it
                run.learner.ping()
            except LearnerRankError:
                pass  # it was: the group is failed now and recovered below
        if run.learner.failed is None:  # not a learner failure: rollout and reward recover inside their groups
            raise error
        if run.pipeline is not None:  # a batch collected ahead: the restore brings its own
            run.pipeline.discard()
        rank_error = next((e for e in _causes(error) if isinstance(e, LearnerRankError)), None)
        rank = rank_error.rank if rank_error is not None else None
        worker = f"learner rank {rank}" if rank is not None else f"learner group ({run.learner.failed})"
        run.faults.learner_failed(err.step, err.phase, worker, error)
        attempts += 1
        try:
            run.replace_learner()
            path = run.ckpt.restore_point()
            state = restore(run, path, wandb_run_id)
            run.push_weights(state.policy_version)
            break
        except PlacementError:  # the new group's resources did not come back in time: nothing to retry
            raise
        except Exception as again:  # lost again while restoring: counts against the same step
            error = again
    logger.truncate_after(state.step)
    run.faults.replayed_steps += err.step - state.step
    run.faults.restarted("learner", rank, err.phase, str(rank_error or error), lost_at, restarts=attempts)
    say(f"learner restored from {path or 'the start of the run'}; replaying from step {state.step}")
    return state


def _causes(err: BaseException | None) -> Iterator[BaseException]:
    while err is not None:
        yield err
        err = err.__cause__


def lost_objects(err: BaseException) -> bool:
    """Whether `err`, an error it was raised from, or a worker error one of them carries is a lost object (its
    owner, or the node that stored it, is gone)."""
    lost = ray.exceptions.ObjectLostError
    return any(isinstance(e, lost) or isinstance(getattr(e, "cause", None), lost) for e in _causes(err))


def sampling_seed(seed: int, step: int, gen_round: int) -> int:
    """A distinct base seed per (run seed, step, round); sample seeds are base + prompt·n + i."""
    return ((seed * 1_000_003 + step) * 64 + gen_round) * 10_000_000


def collect_batch(run: Run, step: int) -> tuple[RolloutBatch, dict[str, float]]:
    """Generation rounds with dynamic sampling until the step's batch is full (or an error after max rounds).
    Each round draws algorithm.gen_batch_prompts prompts, or, with adaptive rounds, what the running keep-rate
    says the missing groups need (orchestration.sampling.RoundSizer). Without dynamic sampling, one round of
    exactly the batch's prompts (DerivedSizes.gen_batch_prompts). On the built-in tasks, the metrics include
    rollout/habit/<habit>_frac, _accuracy, _length over every sample generated this step (before the filter)."""
    a = run.cfg.algorithm
    pool = GroupPool(run.sizes.train_batch_prompts, run.sample_filter)
    rounds = a.max_gen_rounds if run.sample_filter is not None else 1
    seconds = {"timing_s/rollout_generate": 0.0, "timing_s/rollout_score": 0.0}  # summed over the rounds
    habits: list[tuple[str, bool, int]] = []  # built-in tasks: every generated sample's habit, before the filter
    for gen_round in range(rounds):
        size = run.sizes.gen_batch_prompts
        if run.round_sizer is not None:
            size = run.round_sizer.size(run.sizes.train_batch_prompts - len(pool.kept))
        rows = [run.train_rows[i] for i in run.sampler.next_indices(size)]
        start = time.perf_counter()
        samples = generate_rows(run.rollout, rows, run.sampling(sampling_seed(run.cfg.seed, step, gen_round)))
        scored = time.perf_counter()
        rewards = score_rows(run.reward, rows, samples)
        seconds["timing_s/rollout_generate"] += scored - start
        seconds["timing_s/rollout_score"] += time.perf_counter() - scored
        pool.add(group_samples(rows, samples, rewards))
        habits += habit_records(rows, samples, rewards)
        if pool.full():
            if run.round_sizer is not None:
                run.round_sizer.record(len(pool.kept), pool.seen_groups)
            habit_metrics = {f"rollout/habit/{key}": value for key, value in habit_stats(habits).items()}
            return pool.to_batch(run.rollout.pad_token_id, run.shaping), pool.metrics() | seconds | habit_metrics
    raise SamplingError(
        f"dynamic sampling kept {len(pool.kept)} of the {run.sizes.train_batch_prompts} groups a step needs after "
        f"algorithm.max_gen_rounds={rounds} rounds ({dict(pool.drops)} dropped): the task is too easy or too hard "
        "for the model; raise algorithm.max_gen_rounds or algorithm.gen_batch_prompts (trainer.resume=auto goes on "
        "from the last checkpoint)"
    )


def compute_advantages(run: Run, batch: RolloutBatch) -> tuple[RolloutBatch, dict[str, Any]]:
    return run.advantage.compute(batch)


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
    orchestration.evaluation.evaluate_rows, the function the evaluation CLI uses too."""
    sampling = run.sampling(sampling_seed(run.cfg.seed, step, 63), evaluation=True)
    return eval_metrics(evaluate_rows(run.rollout, run.reward, rows, sampling))
