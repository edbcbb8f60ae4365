"""RolloutGroup over Ray actors hosting vLLM engines: sharding and ordering, weight updates through the object
store, and failures that surface as errors within seconds (never a hang). One group start for the module.

Kills are ordered by events, never by how long a generation usually takes: the victim is held at a barrier (a
task the test submits first, waiting for a file), so the call submitted after it is still pending when the kill
lands, on a machine of any speed."""

import time

import pytest
import torch
from float64_checks import check_sample_log_probs

from rollout.engine import PromptTooLongError
from rollout.reference import load_reference_model, perturbed_state_dict
from rollout.tiny import build_tiny_model
from rollout.types import SamplingConfig, samples_to_batch

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.slow]

PROMPTS = [[{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}] for i in range(5)]
TIMEOUT_S = 120.0
"""The group's deadline per call: an error that ends a call before it surfaced from the worker, not the deadline."""


def held_until(gate: str, limit_s: float = 300.0):
    """A function for `worker.__ray_call__`: the worker waits until the file `gate` exists (at most `limit_s`, a
    bound against a hang). The worker's next tasks queue behind it (a Ray actor runs the tasks of one caller in
    order), so a kill sent while they are pending lands before they could finish. Built in a closure so that Ray
    pickles it by value (test modules are not importable in the workers)."""

    def hold(worker) -> None:
        import os
        import time

        deadline = time.monotonic() + limit_s
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)

    return hold


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("rollout_ray") / "model")


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def group(ray_cluster, model_dir):
    from rollout.group import RolloutGroup

    group = RolloutGroup(
        model_dir,
        num_workers=2,
        engine_kwargs={"dtype": "float32", "max_model_len": 256},
        num_cpus_per_worker=1.0,
        timeout_s=TIMEOUT_S,
    )
    yield group
    group.shutdown()


def test_group_shards_whole_prompts_and_gathers_in_prompt_order(group, model_dir):
    assert group.num_workers == 2 and len({info["pid"] for info in group.worker_info}) == 2
    n = 3
    samples = group.generate(PROMPTS, SamplingConfig(n=n, max_tokens=16, seed=0))
    assert [s.prompt_index for s in samples] == [p for p in range(len(PROMPTS)) for _ in range(n)]
    for s in samples:
        assert f"Question {s.prompt_index}:" in bytes(t for t in s.prompt_ids if t < 256).decode()
    check_sample_log_probs(load_reference_model(model_dir), samples)
    batch = samples_to_batch(samples, group.pad_token_id)
    assert batch.group_index.tolist() == [s.prompt_index for s in samples] and batch.policy_version == 0


def test_group_weight_update_from_object_store_buckets(ray_cluster, group, model_dir):
    ray = ray_cluster
    sampling = SamplingConfig(n=2, max_tokens=16, seed=1)
    before = group.generate(PROMPTS, sampling)
    new_state = perturbed_state_dict(model_dir, seed=3)
    items = list(new_state.items())
    buckets = [items[i : i + 5] for i in range(0, len(items), 5)]  # splits fused layers across buckets
    refs = [ray.put(bucket) for bucket in buckets]
    stats = group.update_weights(refs, policy_version=1)
    total_bytes = sum(t.numel() * t.element_size() for t in new_state.values())
    assert [s["bytes"] for s in stats] == [total_bytes, total_bytes]
    assert all(s["num_buckets"] == len(buckets) and s["seconds"] > 0 for s in stats)

    after = group.generate(PROMPTS, sampling)
    assert all(s.policy_version == 1 for s in after)
    assert [s.response_ids for s in after] != [s.response_ids for s in before]
    check_sample_log_probs(load_reference_model(model_dir, new_state), after)


def test_worker_errors_reach_the_caller_with_their_message(group, tmp_path):
    from rollout.group import RolloutGroup

    too_long = PROMPTS[:4] + [[257] * 250]  # prompt 4 lands on worker 1, as its local prompt 1
    start = time.monotonic()
    with pytest.raises(PromptTooLongError, match=r"prompt 4 is too long: 250") as raised:  # bad input: as itself
        group.generate(too_long, SamplingConfig(max_tokens=16))
    assert (raised.value.index, raised.value.prompt_tokens, raised.value.max_tokens) == (4, 250, 16)
    assert time.monotonic() - start < TIMEOUT_S  # raised by the worker, not ended by the call's deadline
    with pytest.raises(ValueError, match="empty batch"):
        group.generate([], SamplingConfig())
    with pytest.raises(FileNotFoundError, match="missing_model"):
        RolloutGroup(tmp_path / "missing_model")
    assert group.generate(PROMPTS[:1], SamplingConfig(max_tokens=4))  # still usable after a worker raised


def test_lost_worker_is_restarted_and_only_its_shard_regenerated(ray_cluster, group, model_dir, tmp_path):
    """Recovery on (a weight source installed): worker 1, SIGKILLed by pid right after a generate is submitted
    (held at a barrier, so its shard cannot have come back first), is restarted, brought to the current weights,
    and its shard alone regenerated: the samples are the ones an undisturbed call returns. Worker 0 lost in a
    weight update gets the same buckets again. A worker that raises is still not retried. (The run-level tests
    in test_train_e2e.py cover the bounded error.)"""
    import os
    import signal

    ray = ray_cluster
    state = perturbed_state_dict(model_dir, seed=5)
    refs = [ray.put(list(state.items()))]
    group.update_weights(refs, policy_version=2)
    sampling = SamplingConfig(n=2, max_tokens=16, seed=7)
    expected = group.generate(PROMPTS, sampling)
    killed: list[tuple[str, int]] = []
    restarts: list[tuple[int, str]] = []

    def kill_once(phase: str, processes: dict) -> None:
        if phase == target[0] and target[1] in processes and target not in killed:
            killed.append(target)
            os.kill(processes[target[1]][0], signal.SIGKILL)

    group.max_restarts = 1
    group.recover_weights = lambda ranks: group.update_weights(refs, group.policy_version, ranks=ranks)
    group.on_submit = kill_once
    group.on_restart = lambda rank, phase, cause, lost_at: restarts.append((rank, phase))
    try:
        pids = [info["pid"] for info in group.worker_info]
        target = ("generate", 1)
        group.workers[1].__ray_call__.remote(held_until(str(tmp_path / "never")))  # the generate queues behind
        samples = group.generate(PROMPTS, sampling)
        assert killed == [target] and restarts == [(1, "generate")] and group.restarts == 1
        assert group.worker_info[0]["pid"] == pids[0] and group.worker_info[1]["pid"] != pids[1]
        assert [(s.prompt_index, s.response_ids, s.policy_version) for s in samples] == [
            (s.prompt_index, s.response_ids, s.policy_version) for s in expected
        ]
        assert all(torch.equal(a.log_probs, b.log_probs) for a, b in zip(samples, expected))

        target = ("update_weights", 0)
        group.workers[0].__ray_call__.remote(held_until(str(tmp_path / "never")))  # the update queues behind
        stats = group.update_weights(refs, policy_version=2)
        assert restarts[-1] == (0, "update_weights") and len(stats) == 2 and stats[0]["bytes"] == stats[1]["bytes"]
        assert [s.response_ids for s in group.generate(PROMPTS, sampling)] == [s.response_ids for s in expected]

        with pytest.raises(PromptTooLongError, match="prompt 4 is too long"):  # raised: no retry
            group.generate(PROMPTS[:4] + [[257] * 250], SamplingConfig(max_tokens=16))
        assert group.restarts == 2
    finally:
        group.recover_weights = group.on_submit = group.on_restart = None
        group.max_restarts = 0


def test_worker_killed_mid_batch_raises_within_seconds(ray_cluster, group, tmp_path):
    """Runs last: it kills worker 1, with the batch in flight (submitted, queued behind a barrier on worker 1:
    the kill, sent when the call's tasks are submitted, cannot come after the batch ended)."""
    ray = ray_cluster
    victim = group.workers[1]
    victim.__ray_call__.remote(held_until(str(tmp_path / "never")))
    group.on_submit = lambda phase, processes: ray.kill(victim)  # ray.kill is asynchronous: lands in flight
    long_batch = SamplingConfig(n=8, max_tokens=200, ignore_eos=True)
    start = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="rollout worker 1 died during generate"):
            group.generate(PROMPTS * 8, long_batch)
    finally:
        group.on_submit = None
    assert time.monotonic() - start < TIMEOUT_S  # the death ended the call, not its deadline
    with pytest.raises(RuntimeError, match="unusable"):
        group.generate(PROMPTS, SamplingConfig(max_tokens=4))
