"""`AdvantageService`: a thin Ray shell over `AdvantageWorker` (the only module of advantage/ that touches Ray).

One actor computes the advantages of each step's batch. The work is a pure function of the batch, so an actor
that dies (or gives no result within `call_timeout_s`) is replaced and the same call submitted again, with the
same result, at most `max_restarts` times per call; beyond that, or with `max_restarts=0`, the call raises
`AdvantageWorkerError` naming the cause. An error raised by the computation itself (a bug, a bad batch) is not
retried: it reaches the caller at once with its traceback.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from actors import location
from advantage.batch import RolloutBatch
from advantage.registry import ADVANTAGE_ESTIMATORS
from advantage.stage import AdvantageStageConfig, AdvantageWorker


class AdvantageWorkerError(RuntimeError):
    """The advantage actor died or did not answer in time, more often than allowed; the message says why."""


class _RayAdvantageWorker(AdvantageWorker):
    """AdvantageWorker plus its actor's process (for fault drills) and location (for the run's layout)."""

    def location(self) -> dict:
        return location()

    def process(self) -> tuple[int, str]:
        """(pid, Ray node id) of this actor's process."""
        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id()


class AdvantageService:
    """One Ray actor running `AdvantageWorker(estimator_name, config)`, replaced when it is lost.

    num_cpus:       Ray CPUs reserved for the actor (fractional values are fine).
    call_timeout_s: bound on one `compute` call; past it the actor counts as lost (stuck).
    max_restarts:   replacements allowed within one call (0: the first loss raises).
    placement:      placement() → extra `ray.remote` options of the actor, called before it is started or
                    replaced (it may wait, bounded, for resources and raise naming them); None: Ray's choice.
    Requires `ray.init()` to have been called.

    Hooks the driver may install (attributes, None by default), as on the rollout and reward groups:
    `on_submit(phase, processes)`, called with phase "compute" and {0: (pid, node_id)} just *before* a call is
    submitted (fault drills: the computation takes milliseconds, so a kill sent after submitting it would race
    with its result); `on_restart(worker, phase, cause, lost_at)`, called once per replacement when the call
    is answered by the new actor (`lost_at`: time.monotonic() when the loss was seen).
    """

    def __init__(
        self,
        estimator_name: str,
        config: AdvantageStageConfig,
        *,
        num_cpus: float = 0.25,
        call_timeout_s: float = 600.0,
        max_restarts: int = 0,
        placement: Callable[[], dict] | None = None,
    ) -> None:
        import ray

        if max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
        ADVANTAGE_ESTIMATORS.get(estimator_name)  # an unknown estimator fails here, in the driver
        self.call_timeout_s = call_timeout_s
        self.max_restarts = max_restarts
        self.restarts = 0
        """Actors replaced so far (over the service's life)."""
        self.on_submit: Callable[[str, dict[int, tuple[int, str]]], None] | None = None
        self.on_restart: Callable[[int, str, str, float], None] | None = None
        self._args = (estimator_name, config)
        self._placement = placement
        self._actor_cls = ray.remote(num_cpus=num_cpus, max_restarts=0)(_RayAdvantageWorker)
        self.worker = self._new_worker()
        """The actor handle (exposed for tests and monitoring)."""

    def compute(self, batch: RolloutBatch) -> tuple[RolloutBatch, dict[str, Any]]:
        """`advantage.stage.compute_advantages` of `batch` on the actor: (batch with advantages, metrics)."""
        import ray

        lost: list[tuple[str, float]] = []  # (cause, time.monotonic() when seen) per replacement in this call
        while True:
            try:
                if self.on_submit is not None:
                    process = ray.get(self.worker.process.remote(), timeout=self.call_timeout_s)
                    self.on_submit("compute", {0: process})
                result = ray.get(self.worker.compute.remote(batch), timeout=self.call_timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
                lost_at = time.monotonic()
                dead = isinstance(err, ray.exceptions.RayActorError)
                cause = f"died: {err}" if dead else f"gave no result within {self.call_timeout_s:g} s"
                self._replace()
                if len(lost) == self.max_restarts:
                    budget = f" ({len(lost)} restart(s) in this call, max_restarts={self.max_restarts})"
                    raise AdvantageWorkerError(f"the advantage actor {cause}{budget}") from err
                lost.append((cause, lost_at))
                continue
            for cause, lost_at in lost:  # reported once the call is answered: the work continues from here
                if self.on_restart is not None:
                    self.on_restart(0, "compute", cause, lost_at)
            return result

    def _replace(self) -> None:
        """Kill the actor (dead or stuck) and start a fresh one with the same arguments."""
        import ray

        ray.kill(self.worker)
        self.worker = self._new_worker()
        self.restarts += 1

    def _new_worker(self) -> Any:
        options = self._placement() if self._placement is not None else {}
        return self._actor_cls.options(**options).remote(*self._args)

    def location(self, timeout_s: float = 120.0) -> dict:
        """Where the actor runs (actors.location), waiting at most `timeout_s` for it to start."""
        import ray

        return ray.get(self.worker.location.remote(), timeout=timeout_s)

    def shutdown(self) -> None:
        import ray

        ray.kill(self.worker)
