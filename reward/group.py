"""`RewardService`: a thin Ray shell over `IsolatedScorer` (the only module of reward/ that touches Ray).

`ray.remote` is applied at runtime to the plain `IsolatedScorer` class; the service creates N such actors,
splits a batch into N contiguous shards (one per actor), and gathers the results in input order. Each actor
owns one child process, so the per-sample time limit and crash isolation are the scorer's (reward.pool).
An actor that dies (or gives no result within `call_timeout_s`) is replaced at once. With `max_restarts` > 0
only its shard is scored again, on the new actor (at most `max_restarts` replacements per call; scoring is a
pure function of the sample, so the results are the same); beyond that, or with `max_restarts=0`, the call
raises `RewardWorkerError` with Ray's message as soon as Ray reports the death. A scorer that raises (a bug in
the reward function's wrapper; the function's own errors are status "error") raises at once.
"""

from __future__ import annotations

import atexit
import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

from actors import Loss, location, supervise
from reward.loader import DEFAULT_REWARD_FN, load_reward_fn
from reward.pool import IsolatedScorer, check_samples
from reward.result import RewardResult


class RewardWorkerError(RuntimeError):
    """A reward worker actor died or did not answer in time; the message says which and why."""


class _RayScorer(IsolatedScorer):
    """IsolatedScorer plus its actor's process (for fault drills) and location (for the run's layout).

    A Ray worker's SIGTERM handler raises SystemExit; when a run ends, a second SIGTERM could land while the exit
    runs the scorer's finalizer (which stops its child) and print a traceback on the run's console. So once the
    process exits, SIGTERM is ignored: the handler below runs before the finalizers (atexit calls the last one
    registered first), and SIGKILL still ends a process whose exit hangs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # registers the finalizers' atexit hook, if nothing had
        atexit.register(signal.signal, signal.SIGTERM, signal.SIG_IGN)

    def process(self) -> tuple[int, str]:
        """(pid, Ray node id) of this actor's process."""
        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id()

    def location(self) -> dict:
        return location()


class RewardService:
    """A pool of `num_workers` Ray actors, each an `IsolatedScorer`, with a batch API.

    num_workers:      actors (each with one scorer child process).
    reward_fn, timeout_s, fn_kwargs, memory_limit_mb: as for `IsolatedScorer`.
    num_cpus_per_worker: Ray CPUs reserved per actor (fractional values are fine).
    call_timeout_s:   bound on one `score_batch` call; None = 60 s + (timeout_s + 2 s) per sample of a shard,
                      i.e. enough even when every sample times out and its child restarts.
    max_restarts:     lost actors replaced and their shard re-scored within one call (0: the call raises).
    placement:        placement(k) → extra `ray.remote` options of actor k, called before it is started or
                      replaced (it may wait, bounded, for resources and raise naming them); None: Ray's choice.
    Requires `ray.init()` to have been called.

    Hooks the driver may install (attributes, None by default): `on_submit(phase, processes)`, called after a
    call's shards are submitted with phase "score" and {worker: (pid, node_id)} (fault drills; fetching the
    pids waits for the actors to be up, so only install it for drills); `on_restart(worker, phase, cause,
    lost_at)`, called after a lost actor was replaced and its shard resubmitted (`lost_at`: time.monotonic()).
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
        max_restarts: int = 0,
        placement: Callable[[int], dict] | None = None,
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
        self.max_restarts = max_restarts
        self.restarts = 0
        """Actors replaced so far (over the service's life)."""
        self.on_submit: Callable[[str, dict[int, tuple[int, str]]], None] | None = None
        self.on_restart: Callable[[int, str, str, float], None] | None = None
        self._scorer_kwargs = {
            "timeout_s": timeout_s,
            "fn_kwargs": fn_kwargs,
            "memory_limit_mb": memory_limit_mb,
        }
        self._reward_fn = reward_fn
        self._placement = placement
        self._actor_cls = ray.remote(num_cpus=num_cpus_per_worker, max_restarts=0)(_RayScorer)
        self.workers: list[Any] = [self._new_worker(k) for k in range(num_workers)]
        """The actor handles (exposed for tests and monitoring)."""

    def score_batch(
        self,
        responses: Sequence[str],
        ground_truths: Sequence[str],
        extras: Sequence[dict[str, Any] | None] | None = None,
    ) -> list[RewardResult]:
        """Score a batch across the actors; one RewardResult per sample, in input order.

        Raises RewardWorkerError when an actor dies or the call exceeds its time bound (after `max_restarts`
        replacements with re-scoring in this call).
        """
        import ray

        samples = check_samples(responses, ground_truths, extras)
        if not samples:
            return []
        shard_size = -(-len(samples) // self.num_workers)
        shards = [samples[i : i + shard_size] for i in range(0, len(samples), shard_size)]
        bound = self.call_timeout_s or 60.0 + shard_size * (self.timeout_s + 2.0)

        def process_of(k: int) -> Any:
            """Worker k's process; a worker that died after its last result came in (a kill that landed just
            after the scoring ended) is replaced first."""
            try:
                return ray.get(self.workers[k].process.remote())
            except ray.exceptions.RayActorError as e:
                lost_at = time.monotonic()
                self._replace(k)
                process = ray.get(self.workers[k].process.remote())
                if self.on_restart is not None:
                    self.on_restart(k, "score", f"found dead before the call: {e}", lost_at)
                return process

        def give_up(lost: list[Loss], restarted: int) -> RewardWorkerError:
            budget = f" ({restarted} re-scored in this call, max_restarts={self.max_restarts})"
            causes = "; ".join(f"reward worker {loss.worker} of {self.num_workers} {loss.cause}" for loss in lost)
            return RewardWorkerError(causes + (budget if self.max_restarts else ""))

        results = supervise(
            "score",
            range(len(shards)),
            lambda k: self.workers[k].score_samples.remote(shards[k]),
            self._replace,
            give_up,
            timeout_s=bound,
            max_restarts=self.max_restarts,
            lost_errors=(ray.exceptions.RayActorError,),
            timed_out=f"gave no result within {bound:.0f} s",
            replace_at_once=True,  # so that no later call queues behind a dead or stuck actor
            process_of=process_of,
            on_submit=self.on_submit,
            on_restart=self.on_restart,
        )
        return [result for k in range(len(shards)) for result in results[k]]

    def _replace(self, k: int) -> None:
        """Kill worker k (dead or stuck) and start a fresh one in its place."""
        import ray

        ray.kill(self.workers[k])
        self.workers[k] = self._new_worker(k)
        self.restarts += 1

    def shutdown(self) -> None:
        """Kill every actor (their child processes die with them)."""
        import ray

        for worker in self.workers:
            ray.kill(worker)
        self.workers = []

    def locations(self, timeout_s: float = 120.0) -> list[dict]:
        """Where each actor runs (actors.location), waiting at most `timeout_s` for them to start."""
        import ray

        return ray.get([worker.location.remote() for worker in self.workers], timeout=timeout_s)

    def _new_worker(self, k: int) -> Any:
        options = self._placement(k) if self._placement is not None else {}
        return self._actor_cls.options(**options).remote(self._reward_fn, **self._scorer_kwargs)
