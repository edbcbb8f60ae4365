"""RewardService through Ray with 2 workers: input order, statuses, and a dead actor surfacing fast.

Ordered by events, never by how long scoring usually takes: a kill "while a call is in flight" waits for the
scorer to write a marker file from inside the call (tests/test_reward_userfns.py: the "gate" command), and a
shard that must still be running when a fault lands is held at a gate file the test opens only afterwards."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from reward import RewardService, RewardWorkerError  # noqa: E402

pytestmark = pytest.mark.ray

TESTS_DIR = Path(__file__).resolve().parent
USER_FNS = "test_reward_userfns:by_command"  # math answers as reward.math, plus the "gate" barrier


@pytest.fixture(scope="module")
def local_ray():
    """conftest's local Ray, with tests/ on the workers' PYTHONPATH: the scorers (Ray actors and their child
    processes) import test_reward_userfns."""
    path = os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})  # fmt: skip
    yield
    ray.shutdown()


def wait_for_file(path: Path, what: str, limit_s: float = 120.0) -> None:
    """Wait until `path` exists (`limit_s`: a bound against a hang, generous for a slow, loaded machine)."""
    deadline = time.monotonic() + limit_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{what}: no {path.name} within {limit_s:g} s"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def service(local_ray):
    svc = RewardService(num_workers=2, timeout_s=1.0)
    yield svc
    svc.shutdown()


def test_order_and_statuses(service):
    responses = [f"Answer: {n}" for n in range(40)]
    truths = [str(n) if n % 3 else "-1" for n in range(40)]
    responses[5] = "Answer: $9^{9^{9}}$"  # hangs in sympy: must come back as a timeout, in its place
    results = service.score_batch(responses, truths)
    assert len(results) == 40
    for n, result in enumerate(results):
        if n == 5:
            assert (result.status, result.score, result.correct) == ("timeout", 0.0, False)
        else:
            assert result.status == "ok"
            assert result.correct is (n % 3 != 0)
            assert result.extracted == str(n)
            assert result.latency_s is not None
    assert service.score_batch([], []) == []


def test_bad_reward_fn_fails_in_the_driver(local_ray):
    with pytest.raises(ValueError, match="'reward.math:missing'"):
        RewardService(num_workers=1, reward_fn="reward.math:missing")


def test_killed_actor_surfaces_fast_and_is_replaced(service, tmp_path):
    # killed while idle (ray.kill is asynchronous: wait until the actor is really gone)
    ray.kill(service.workers[0])
    _wait_until_dead(service.workers[0])
    start = time.monotonic()
    with pytest.raises(RewardWorkerError, match="worker 0 of 2 died"):
        service.score_batch(["Answer: 1"] * 4, ["1"] * 4)
    # "died", not "gave no result": the death ended the call. Its own deadline (60 s + 3 s per sample of a shard)
    # is the bound: a machine 5x slower than this one still sees the death in a few seconds.
    assert time.monotonic() - start < 60.0

    # killed in the middle of a call: worker 1's first sample writes a marker from inside the call, then waits at
    # a gate that is never opened (a 300 s limit per sample): only the kill can end that call, and the kill is
    # sent once the marker shows the call in flight. The call's deadline (90 s) bounds it if the kill never lands.
    gated = RewardService(num_workers=2, reward_fn=USER_FNS, timeout_s=300.0, num_cpus_per_worker=0.25,
                          call_timeout_s=90.0)  # fmt: skip
    try:
        entered, never = tmp_path / "entered", tmp_path / "never"
        victim = gated.workers[1]
        killer = threading.Thread(target=lambda: (wait_for_file(entered, "worker 1's call"), ray.kill(victim)))
        killer.start()
        start = time.monotonic()
        with pytest.raises(RewardWorkerError, match="worker 1 of 2 died"):
            gated.score_batch(
                ["Answer: 1", "Answer: 2", "gate", "Answer: 3"],
                ["1"] * 4,
                [None, None, {"entered": str(entered), "gate": str(never)}, None],
            )
        killer.join()
        assert entered.exists() and time.monotonic() - start < 90.0
        # the dead actor was replaced: this service answers again
        assert [r.correct for r in gated.score_batch(["Answer: 1", "Answer: 2"], ["1", "1"])] == [True, False]
    finally:
        gated.shutdown()

    # the dead actors were replaced: the service answers again
    results = service.score_batch(["Answer: 1", "Answer: 2"], ["1", "1"])
    assert [r.correct for r in results] == [True, False]


def _wait_until_dead(actor, limit_s: float = 120.0) -> None:
    """Poll until Ray reports the actor dead. A call to a killed actor may hang until Ray notices the death (a
    loaded machine: seconds): a call that does not answer in 5 s is asked again, up to `limit_s`."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.score_samples.remote([]), timeout=5)
        except ray.exceptions.RayActorError:
            return
        except ray.exceptions.GetTimeoutError:
            continue
        time.sleep(0.05)
    raise AssertionError("the killed actor still answers")


def test_lost_actor_is_replaced_and_only_its_shard_rescored(local_ray, tmp_path):
    """max_restarts > 0: an actor SIGKILLed by pid right after its shard is submitted (fault injection of
    orchestration/cluster/faults.py) is replaced and only its shard scored again, with the same results; an actor
    killed on every attempt ends the call after max_restarts with the worker named."""
    from orchestration.cluster.faults import Faults
    from orchestration.config.faults import FaultSpec

    # Each shard starts with a "gate" sample that waits for its gate file. The victim's gate is closed while the
    # fault is injected, so its shard cannot have been returned before the SIGKILL lands (on any machine: an
    # earlier version relied on 500 answers per shard taking longer than the kill). The per-sample limit (120 s)
    # only ends a gate that is never opened (the results would then differ: no hang, a failure).
    service = RewardService(num_workers=2, reward_fn=USER_FNS, timeout_s=120.0, num_cpus_per_worker=0.25,
                            max_restarts=1, call_timeout_s=300.0)  # fmt: skip
    try:
        gates = [tmp_path / "gate0", tmp_path / "gate1"]
        for gate in gates:
            gate.touch()
        shard = 50  # samples per shard: 2 workers, 100 samples
        responses = [("gate" if n % shard == 0 else f"Answer: {n}") for n in range(2 * shard)]
        truths = [str(n % 3) for n in range(2 * shard)]
        extras = [{"gate": str(gates[n // shard])} for n in range(2 * shard)]
        expected = service.score_batch(responses, truths, extras)
        faults = Faults([FaultSpec.parse("reward:1@0:score")], max_restarts=1)
        faults.attach("reward", service)
        reported = service.on_restart

        def open_gate_1(*args) -> None:  # the loss was seen and the shard resubmitted: let the new actor pass
            reported(*args)
            gates[1].touch()

        service.on_restart = open_gate_1
        gates[1].unlink()
        untouched = service.workers[0]
        results = service.score_batch(responses, truths, extras)
        assert [(r.status, r.score, r.correct, r.extracted) for r in results] == [
            (r.status, r.score, r.correct, r.extracted) for r in expected
        ]
        assert service.restarts == 1 and service.workers[0] is untouched
        assert [(e["kind"], e["index"], e["phase"]) for e in faults.events] == [("reward", 1, "score")]
        assert faults.metrics()["fault/reward_restarts"] == 1.0

        faults.specs = [FaultSpec.parse("reward:0@0:score:always")]
        gates[0].unlink()  # worker 0 (and its replacement) held until killed
        with pytest.raises(RewardWorkerError, match=r"(?s)reward worker 0 of 2 died.*max_restarts=1"):
            service.score_batch(responses, truths, extras)
        assert service.restarts == 3
        faults.specs = []
        gates[0].touch()
        assert [r.correct for r in service.score_batch(responses, truths, extras)] == [r.correct for r in expected]
    finally:
        service.shutdown()
