"""AdvantageService through Ray: the advantages come back right, and a lost actor (SIGKILLed by pid, as the
drills do) is replaced and the call answered, within trainer.max_restarts, counted and reported."""

from __future__ import annotations

import math
import os
import signal
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from advantage import RolloutBatch  # noqa: E402
from advantage.group import AdvantageService, AdvantageWorkerError  # noqa: E402
from advantage.stage import AdvantageStageConfig  # noqa: E402
from orchestration.cluster.faults import Faults  # noqa: E402
from orchestration.config.faults import FaultSpec  # noqa: E402

pytestmark = pytest.mark.ray

A = 1.0 / (math.sqrt(2.0) + 1e-6)  # GRPO on rewards [1, -1]: mean 0, unbiased std sqrt(2), eps 1e-6


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def scored_batch() -> RolloutBatch:
    """Two groups of two samples, rewards [1, -1] in each, 3 response tokens (the last sample's third masked)."""
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[3, 2] = False
    return RolloutBatch(
        prompt_ids=torch.zeros(4, 2, dtype=torch.long),
        prompt_mask=torch.ones(4, 2, dtype=torch.bool),
        response_ids=torch.ones(4, 3, dtype=torch.long),
        response_mask=mask,
        rollout_log_probs=torch.full((4, 3), -0.5),
        group_index=torch.tensor([0, 0, 1, 1]),
        rewards=torch.tensor([1.0, -1.0, 1.0, -1.0]),
        correct=torch.tensor([True, False, True, False]),
        reward_status=torch.zeros(4, dtype=torch.int8),
        policy_version=0,
    )


def expected_advantages() -> torch.Tensor:
    return torch.tensor([[A] * 3, [-A] * 3, [A] * 3, [-A, -A, 0.0]])


def kill(service: AdvantageService, limit_s: float = 120.0) -> None:
    """SIGKILL the actor's process and wait until Ray reports it dead (the event the next call relies on). A call
    to the killed actor may hang until Ray notices the death (seconds on a loaded machine): one that does not
    answer in 5 s is asked again, up to `limit_s` (a bound against a hang only)."""
    pid, _ = ray.get(service.worker.process.remote())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            ray.get(service.worker.process.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            continue
        time.sleep(0.1)
    raise AssertionError("the killed advantage actor is still answering")


def test_advantages_come_back_and_a_dead_actor_is_replaced(ray_cluster):
    service = AdvantageService("grpo", AdvantageStageConfig(), max_restarts=1)
    reports = []
    service.on_restart = lambda *args: reports.append(args)
    try:
        out, metrics = service.compute(scored_batch())
        assert torch.allclose(out.advantages, expected_advantages(), atol=1e-6)
        assert metrics["advantage/max"].item() == pytest.approx(A)

        kill(service)  # dead between two calls: the next call finds it dead, replaces it and is answered
        out, _ = service.compute(scored_batch())
        assert torch.allclose(out.advantages, expected_advantages(), atol=1e-6)
        assert service.restarts == 1
        [(worker, phase, cause, lost_at)] = reports
        assert (worker, phase) == (0, "compute") and cause.startswith("died:") and lost_at <= time.monotonic()

        # an error of the computation itself is not a lost actor: raised at once, nothing replaced
        with pytest.raises(ray.exceptions.RayTaskError, match="needs a scored batch"):
            service.compute(scored_batch().replace(rewards=None))
        assert service.restarts == 1
    finally:
        service.shutdown()


def test_drill_kills_are_counted_and_bounded(ray_cluster):
    service = AdvantageService("grpo", AdvantageStageConfig(), max_restarts=1)
    try:
        faults = Faults([FaultSpec.parse("advantage:0@0:compute")], max_restarts=1)
        faults.attach("advantage", service)
        out, _ = service.compute(scored_batch())
        assert torch.allclose(out.advantages, expected_advantages(), atol=1e-6)
        assert [(e["kind"], e["index"], e["phase"]) for e in faults.events] == [("advantage", 0, "compute")]
        assert faults.metrics()["fault/advantage_restarts"] == 1.0 and service.restarts == 1

        faults.specs = [FaultSpec.parse("advantage:0@0:compute:always")]  # killed on every attempt
        with pytest.raises(
            AdvantageWorkerError, match=r"(?s)advantage actor died.*1 restart\(s\) in this call, max_restarts=1"
        ):
            service.compute(scored_batch())
        faults.specs = []
        out, _ = service.compute(scored_batch())  # the service still works: the last loss was replaced too
        assert torch.allclose(out.advantages, expected_advantages(), atol=1e-6)
    finally:
        service.shutdown()


def test_no_restarts_allowed_raises_on_the_first_loss(ray_cluster):
    service = AdvantageService("grpo", AdvantageStageConfig(), max_restarts=0)
    try:
        kill(service)
        with pytest.raises(AdvantageWorkerError, match="the advantage actor died"):
            service.compute(scored_batch())
    finally:
        service.shutdown()


def test_unknown_estimator_fails_in_the_driver(ray_cluster):
    with pytest.raises(Exception, match="nope"):
        AdvantageService("nope", AdvantageStageConfig())
