"""`RewardService`: a thin Ray shell over `IsolatedScorer` (the only module of reward/ that touches Ray).

`ray.remote` is applied at runtime to the plain `IsolatedScorer` class; the service creates N such actors,
splits a batch into N contiguous shards (one per actor), and gathers the results in input order. Each actor
owns one child process, so the per-sample time limit and crash isolation are the scorer's (reward.pool).
If an actor dies, the call raises `RewardWorkerError` with Ray's message as soon as Ray reports the death
(and at the latest after `call_timeout_s`), and the dead actor is replaced for the next call.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from reward.loader import DEFAULT_REWARD_FN, load_reward_fn
from reward.pool import IsolatedScorer, check_samples
from reward.result import RewardResult


class RewardWorkerError(RuntimeError):
    """A reward worker actor died or did not answer in time; the message says which and why."""


class RewardService:
    """A pool of `num_workers` Ray actors, each an `IsolatedScorer`, with a batch API.

    num_workers:      actors (each with one scorer child process).
    reward_fn, timeout_s, fn_kwargs, memory_limit_mb: as for `IsolatedScorer`.
    num_cpus_per_worker: Ray CPUs reserved per actor (fractional values are fine).
    call_timeout_s:   bound on one `score_batch` call; None = 60 s + (timeout_s + 2 s) per sample of a shard,
                      i.e. enough even when every sample times out and its child restarts.
    Requires `ray.init()` to have been called.
    """

    def __init__(
        self,
        num_workers: int = 2,
        reward_fn: str = DEFAULT_REWARD_FN,
        *,
        timeout_s: float = 5.0,
        fn_kwargs: dict[str, Any] | None = None,
        memory_limit_mb: int | None = 2048,
        num_cpus_per_worker: float = 1.0,
        call_timeout_s: float | None = None,
    ) -> None:
        import ray

        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        load_reward_fn(reward_fn)  # fail here, in the driver, with the path in the message
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.call_timeout_s = call_timeout_s
        self._scorer_kwargs = {
            "timeout_s": timeout_s,
            "fn_kwargs": fn_kwargs,
            "memory_limit_mb": memory_limit_mb,
        }
        self._reward_fn = reward_fn
        self._actor_cls = ray.remote(num_cpus=num_cpus_per_worker, max_restarts=0)(IsolatedScorer)
        self.workers: list[Any] = [self._new_worker() for _ in range(num_workers)]
        """The actor handles (exposed for tests and monitoring)."""

    def score_batch(
        self,
        responses: Sequence[str],
        ground_truths: Sequence[str],
        extras: Sequence[dict[str, Any] | None] | None = None,
    ) -> list[RewardResult]:
        """Score a batch across the actors; one RewardResult per sample, in input order.

        Raises RewardWorkerError when an actor dies or the call exceeds its time bound.
        """
        import ray

        samples = check_samples(responses, ground_truths, extras)
        if not samples:
            return []
        shard_size = -(-len(samples) // self.num_workers)
        shards = [samples[i : i + shard_size] for i in range(0, len(samples), shard_size)]
        refs = [self.workers[k].score_samples.remote(shard) for k, shard in enumerate(shards)]
        worker_of = {ref: k for k, ref in enumerate(refs)}
        bound = self.call_timeout_s or 60.0 + shard_size * (self.timeout_s + 2.0)
        deadline = time.monotonic() + bound
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                late = sorted(worker_of[r] for r in pending)
                for k in late:  # stuck actors are replaced, so the next call does not queue behind them
                    ray.kill(self.workers[k])
                    self.workers[k] = self._new_worker()
                raise RewardWorkerError(f"reward workers {late} gave no result within {bound:.0f} s")
            try:
                ray.get(ready[0])
            except ray.exceptions.RayActorError as e:
                k = worker_of[ready[0]]
                self.workers[k] = self._new_worker()  # replace it for the next call
                raise RewardWorkerError(f"reward worker {k} of {self.num_workers} died: {e}") from e
        results: list[RewardResult] = []
        for shard_results in ray.get(refs):
            results.extend(shard_results)
        return results

    def shutdown(self) -> None:
        """Kill every actor (their child processes die with them)."""
        import ray

        for worker in self.workers:
            ray.kill(worker)
        self.workers = []

    def _new_worker(self) -> Any:
        return self._actor_cls.remote(self._reward_fn, **self._scorer_kwargs)
