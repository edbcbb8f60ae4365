"""`AdvantageService`: a thin Ray shell over `AdvantageWorker` (the only module of advantage/ that touches Ray).

One actor computes the advantages of each step's batch. The work is a pure function of the batch, so an actor
that dies (or gives no result within `call_timeout_s`) is replaced and the same call submitted again, with the
same result, at most `max_restarts` times per call; beyond that, or with `max_restarts=0`, the call raises
`AdvantageWorkerError` naming the cause. An error raised by the computation itself (a bug, a bad batch) is not
retried: it reaches the caller at once with its traceback.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from actors import Loss, location, supervise
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

        def submit(_: int) -> ray.ObjectRef:
            if self.on_submit is not None:  # first: the computation takes milliseconds (see the class doc)
                process = ray.get(self.worker.process.remote(), timeout=self.call_timeout_s)
                self.on_submit("compute", {0: process})
            return self.worker.compute.remote(batch)

        def give_up(lost: list[Loss], restarted: int) -> AdvantageWorkerError:
            [loss] = lost
            budget = f" ({restarted} restart(s) in this call, max_restarts={self.max_restarts})"
            error = AdvantageWorkerError(f"the advantage actor {loss.cause}{budget}")
            error.__cause__ = loss.error  # as `raise ... from loss.error`
            return error

        restarts: list[tuple[int, str, str, float]] = []
        results = supervise(
            "compute",
            [0],
            submit,
            lambda _: self._replace(),
            give_up,
            timeout_s=self.call_timeout_s,
            max_restarts=self.max_restarts,
            lost_errors=(ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError),
            timed_out=f"gave no result within {self.call_timeout_s:g} s",
            replace_at_once=True,
            on_restart=lambda *restart: restarts.append(restart),
        )
        for restart in restarts:  # reported once the call is answered: the work continues from here
            if self.on_restart is not None:
                self.on_restart(*restart)
        return results[0]

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
