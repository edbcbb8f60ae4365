"""A phase that misses its deadline fails naming the phase and showing the stuck actor's stack."""

import time

import pytest
import ray

from orchestration.run import ray_runtime_env
from orchestration.steps import PhaseError, phase


@pytest.mark.ray
def test_stuck_stage_reports_actor_stack(tmp_path):
    stack_dir = tmp_path / "stacks"
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env=ray_runtime_env(stack_dir, {}))
    try:

        class Sleeper:  # defined here so Ray pickles it by value (test modules are not importable in workers)
            def ping(self) -> str:
                return "up"

            def nap_in_project_code(self, seconds: float) -> str:
                time.sleep(seconds)
                return "woke"

        actor = ray.remote(num_cpus=0.5)(Sleeper).remote()
        # The worker process is up before the deadline starts: on a loaded machine its start-up alone can take
        # longer than the 3 s deadline, and the dump would then show an actor that is not yet in the nap.
        assert ray.get(actor.ping.remote(), timeout=120) == "up"
        ref = actor.nap_in_project_code.remote(60)
        timings: dict[str, float] = {}
        start = time.monotonic()
        with pytest.raises(PhaseError) as info:
            with phase("rollout", 7, timings, str(stack_dir)):
                ray.get(ref, timeout=3)
        message = str(info.value)
        assert "step 7: phase 'rollout' failed" in message and "GetTimeoutError" in message
        assert "nap_in_project_code" in message and "test_orchestration_stacks.py" in message
        assert time.monotonic() - start < 20  # bounded: the deadline plus the dump
        ray.kill(actor)
    finally:
        ray.shutdown()


def test_successful_stage_records_time_and_plain_failure_has_no_stacks(tmp_path):
    timings: dict[str, float] = {}
    with phase("update", 0, timings, str(tmp_path)):
        pass
    assert timings["timing_s/update"] >= 0
    with pytest.raises(PhaseError, match=r"step 3: phase 'update' failed after .* ValueError: boom$"):
        with phase("update", 3, timings, str(tmp_path)):
            raise ValueError("boom")
