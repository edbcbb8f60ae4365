"""Rollout batches for the training loop: collected when the step needs them, or one step ahead.

`trainer.max_staleness` chooses:

* 0, synchronous: step k's batch is collected at the start of step k, with the engines holding version k (the
  weights step k trains from): on-policy, the loop as it always was.
* 1, one step off-policy: while step k trains (old log-probs, update), a background thread collects step
  k + 1's batch with the engines' current weights, version k; the loop waits for it (`drain`) before it pushes
  version k + 1 to the engines. Step k + 1 then trains from version k + 1 on samples of version k: staleness 1,
  never more (the loop checks every batch's version). Generation and training overlap; the step takes about
  max(rollout, learner) + the weight push instead of their sum.

Which version generates which batch is fixed by this schedule, not by timing: batch k + 1's generation starts
after version k is pushed and always finishes before version k + 1 is, so two runs with the same seed are
identical. π_old is still recomputed by the learner before each update (FIPO equals DAPO on the first
mini-batch, as in the official code); the gap between the sampling version and π_old is measured in
`mismatch/*` and can be corrected with `algorithm.rollout_is_cap`.

Threads: while a batch is collected in the background, only that thread calls the rollout engines and the
reward service; the loop keeps the learner (whose ranks must see calls in one order) and waits (`drain`)
before it pushes weights, evaluates or saves. A checkpoint taken with a batch collected ahead stores that
batch (`state_dict`), so a resumed run trains on exactly the batch the uninterrupted one did.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from advantage import RolloutBatch
from orchestration.run import Run
from orchestration.steps import collect_batch

Collected = tuple[RolloutBatch, dict[str, float]]


class RolloutPipeline:
    """The loop's source of batches (see the module docstring). `max_staleness`: 0 or 1."""

    def __init__(self, run: Run, max_staleness: int) -> None:
        if max_staleness not in (0, 1):
            raise ValueError(f"max_staleness must be 0 or 1, got {max_staleness}")
        self.run = run
        self.max_staleness = max_staleness
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="rollout") if max_staleness else None
        self._pending: tuple[int, Future | Collected] | None = None  # (step, its collection)

    def _collect(self, step: int) -> Collected:
        start = time.perf_counter()
        batch, metrics = collect_batch(self.run, step)
        return batch, metrics | {"timing_s/rollout_busy": time.perf_counter() - start}

    def batch(self, step: int, policy_version: int) -> Collected:
        """Step `step`'s batch and its metrics: the one collected ahead (waiting for it), else collected now.
        `policy_version`: the learner's version this step trains from; the batch's staleness (that minus the
        version that sampled it) is checked against max_staleness and reported as rollout/staleness."""
        if self._pending is None:
            batch, metrics = self._collect(step)
        else:
            pending_step, collected = self._pending
            self._pending = None
            if pending_step != step:
                raise RuntimeError(f"the batch collected ahead is for step {pending_step}, not {step}")
            batch, metrics = collected.result() if isinstance(collected, Future) else collected
        staleness = policy_version - batch.policy_version
        if not 0 <= staleness <= self.max_staleness:
            raise RuntimeError(
                f"step {step}: batch of policy version {batch.policy_version} for a learner at version "
                f"{policy_version}: staleness {staleness} is outside [0, trainer.max_staleness={self.max_staleness}]"
            )
        return batch, metrics | {"rollout/staleness": float(staleness)}

    def start(self, step: int) -> None:
        """With max_staleness 1: begin collecting step `step`'s batch in the background, with the weights the
        engines hold now. A no-op when synchronous."""
        if self._executor is not None and step < self.run.cfg.trainer.total_steps:
            self._pending = (step, self._executor.submit(self._collect, step))

    def drain(self) -> None:
        """Wait until no collection is in flight (the engines must be idle before a weight push, an evaluation
        or a checkpoint); its batch stays pending for its step. A failed collection raises here."""
        if self._pending is not None and isinstance(self._pending[1], Future):
            step, future = self._pending
            self._pending = (step, future.result())

    def discard(self) -> None:
        """Drop the batch collected ahead, waiting for a collection in flight and ignoring how it ended (after a
        learner restore, which brings its own)."""
        if self._pending is not None and isinstance(self._pending[1], Future):
            self._pending[1].exception()  # waits; whatever it raised is moot now
        self._pending = None

    def state_dict(self) -> dict[str, Any] | None:
        """The batch collected ahead, for a checkpoint (call `drain` first); None when there is none."""
        if self._pending is None:
            return None
        step, collected = self._pending
        if isinstance(collected, Future):
            raise RuntimeError("state_dict during a collection in flight: drain() first")
        return {"step": step, "batch": collected[0], "metrics": collected[1]}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore what `state_dict` returned (None: nothing pending)."""
        self._pending = None if state is None else (state["step"], (state["batch"], state["metrics"]))

    def close(self) -> None:
        """Stop without waiting: after a failure a collection may still be running; shutting the run's actors
        down (which the caller does next) ends it."""
        self._pending = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
