"""The learner as a Ray group of two FSDP2 ranks over gloo: world-size invariance against an in-process
single rank, exact sharded resume, HF export, weights into a vLLM engine, host memory while loading, and a
failing rank.

One Ray cluster and one learner group for the module (tests run in file order; the last one breaks the group).
"""

import copy
import os
import signal
import time
from dataclasses import replace

import pytest
import ray
import torch
import torch.distributed as dist
from float64_checks import Run, check_first_step, check_sample_log_probs, check_second_step
from safetensors.torch import load_file

from learner.config import LearnerConfig, LRScheduleConfig, OptimizerConfig
from learner.distributed import free_port, init_distributed
from learner.group import LearnerGroup, LearnerRankError
from learner.synthetic import random_batch
from learner.worker import LearnerWorker
from rollout.reference import load_reference_model
from rollout.tiny import VOCAB_SIZE, build_tiny_model

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def held_until(gate: str, limit_s: float = 300.0):
    """A function for `actor.__ray_call__`: the actor waits until the file `gate` exists (at most `limit_s`, a
    bound against a hang). The actor's next tasks queue behind it (a Ray actor runs the tasks of one caller in
    order), so a kill sent while they are pending lands before they could finish, on a machine of any speed.
    Built in a closure so that Ray pickles it by value (test modules are not importable in the workers)."""

    def hold(actor) -> None:
        import os
        import time

        deadline = time.monotonic() + limit_s
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)

    return hold


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("learner_ray") / "tiny"))


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def make_config(model_dir) -> LearnerConfig:
    return LearnerConfig(
        model_dir=model_dir,
        mini_batch_samples=8,
        micro_batch_tokens=70,  # a few micro-batches per rank, not always as many on both ranks
        policy_loss="fipo",
        optimizer=OptimizerConfig(lr=1e-3),
        lr_schedule=LRScheduleConfig(warmup_steps=2),
        collective_timeout_s=15.0,
    )


@pytest.fixture(scope="module")
def group(model_dir, ray_cluster):
    group = LearnerGroup(make_config(model_dir), world_size=2, num_cpus_per_rank=1, call_timeout_s=120)
    yield group
    group.shutdown()


@pytest.mark.filterwarnings("ignore:FIPO with one mini-batch")  # two update calls of one mini-batch each
def test_two_ranks_update_like_one(group, model_dir):
    """Same data, world size 2 (Ray, gloo) vs 1 (in-process): both against an independent float64 computation
    with float32 rounding bounds (tests/float64_checks.py says which and why), so the loss is normalised by the
    global token count, rank gradients are summed, not averaged, and every weight difference after the first
    step is the gradient's rounding amplified by AdamW's 1 / (|g| + ε), not a different update."""
    batch = random_batch(16, vocab_size=VOCAB_SIZE, seed=21)  # two mini-batches of 8 → 4 rows per rank
    first, rest = batch.select(slice(0, 8)), batch.select(slice(8, None))
    config = make_config(model_dir)

    def run(learner) -> Run:
        old = learner.compute_log_probs(batch)
        metrics = learner.update(first.replace(old_log_probs=old[:8]))
        after_first = copy.deepcopy(learner.full_state_dict(optimizer=True))  # in-process: live tensors
        metrics += learner.update(rest.replace(old_log_probs=old[8:]))
        return Run(old, metrics, after_first, learner.full_state_dict(optimizer=True))

    start = group.full_state_dict()["model"]
    runs = {"two": run(group)}
    created = not dist.is_initialized()
    if created:
        init_distributed(0, 1, "127.0.0.1", free_port(), timeout_s=60)
    try:
        runs["one"] = run(LearnerWorker(config))
    finally:
        if created:
            dist.destroy_process_group()
    check_first_step(model_dir, first, config, start, runs)
    check_second_step(model_dir, rest, runs)
    two = runs["two"].metrics
    assert two[0]["learner/ppo_kl"] == 0.0 and two[0]["learner/influence_weights_max"] == 1.0  # Δ ≡ 0, f ≡ 1
    assert two[1]["learner/influence_weights_max"] > 1.0  # FIPO active on the second mini-batch


def test_sharded_checkpoint_restore_repeats_the_update_exactly(group, tmp_path):
    first, second = random_batch(16, vocab_size=VOCAB_SIZE, seed=31), random_batch(16, vocab_size=VOCAB_SIZE, seed=32)
    group.update(first.replace(old_log_probs=group.compute_log_probs(first)))
    group.save_checkpoint(str(tmp_path / "ckpt"))
    expected_old = group.compute_log_probs(second)
    expected = group.update(second.replace(old_log_probs=expected_old))
    expected_state = group.full_state_dict(optimizer=True)

    group.load_checkpoint(str(tmp_path / "ckpt"))  # back to the saved state, then the same update again
    resumed_old = group.compute_log_probs(second)
    resumed = group.update(second.replace(old_log_probs=resumed_old))
    state = group.full_state_dict(optimizer=True)
    assert torch.equal(resumed_old, expected_old)
    strip = lambda ms: [{k: v for k, v in m.items() if not k.startswith("perf/")} for m in ms]  # noqa: E731
    assert strip(resumed) == strip(expected)
    assert all(torch.equal(state["model"][k], v) for k, v in expected_state["model"].items())
    for name, moments in expected_state["optimizer"]["state"].items():
        for key, value in moments.items():
            assert torch.equal(torch.as_tensor(state["optimizer"]["state"][name][key]), torch.as_tensor(value))

    group.export_hf(str(tmp_path / "hf"))  # the HF export gathers the shards of both ranks
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert all(torch.equal(exported[k], v) for k, v in state["model"].items())


def test_weight_buckets_hold_the_full_weights(group):
    """The buckets rank 0 returns (point-to-point gathers of uneven dim-0 shards: 259 vocabulary rows over
    two ranks) are exactly the full state dict, in order."""
    state = group.full_state_dict()["model"]
    buckets = group.start_weight_buckets(64 << 10)
    received = [item for ref in buckets.refs for item in ray.get(ref)]
    group.finish_weight_buckets(buckets)
    assert len(buckets.refs) > 1 and [name for name, _ in received] == list(state)
    assert all(torch.equal(tensor, state[name]) for name, tensor in received)
    assert buckets.nbytes == sum(t.numel() * t.element_size() for _, t in received)

    def packed_buckets(actor) -> list[tuple[list[str], torch.Tensor | None]]:  # what the gloo transport sends
        out = []
        for names, _ in actor.worker.weight_bucket_plan(64 << 10):
            bucket, packed = actor.worker.gather_packed_bucket(names)
            out.append(([name for name, _ in bucket], packed))
        return out

    rank0, rank1 = ray.get([actor.__ray_call__.remote(packed_buckets) for actor in group.actors])
    assert all(packed is None for _, packed in rank1)
    packed_names = [name for names, _ in rank0 for name in names]
    packed_bytes = torch.cat([packed for _, packed in rank0])
    assert packed_names == list(state)
    assert torch.equal(packed_bytes, torch.cat([state[name].reshape(-1).view(torch.uint8) for name in state]))


@ray.remote(num_cpus=1, max_calls=1)  # a fresh process per rank: its peak memory is its own
def _load_rank(config: LearnerConfig, rank: int, world_size: int, port: int) -> int:
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401  (imported before the measured region)

    from learner.memory import PeakMemory

    init_distributed(rank, world_size, "127.0.0.1", port, timeout_s=60)
    try:
        with PeakMemory("cpu") as peak:
            worker = LearnerWorker(config)
        dist.barrier()
        del worker
        return peak.bytes
    finally:
        dist.destroy_process_group()


def test_loading_holds_a_full_copy_only_on_rank_0(ray_cluster, tmp_path):
    """Rank 0 alone reads the checkpoint; rank 1 builds on the meta device and receives its shards one tensor
    at a time: its peak host memory growth while constructing the worker stays ≤ 0.6 × the model's float32
    size (half of the weights, ~12 MiB of libraries and buffers, and about three copies of the largest tensor,
    which is in flight: 6 MiB here), on a ~650 MB model."""
    big = build_tiny_model(
        tmp_path / "big", hidden_size=768, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
        intermediate_size=2048,
    )  # fmt: skip
    full_bytes = (big / "model.safetensors").stat().st_size  # float32 weights (+ a small header)
    config = LearnerConfig(model_dir=str(big), mini_batch_samples=2, micro_batch_tokens=64, policy_loss="dapo")
    port = free_port()
    peaks = ray.get([_load_rank.remote(config, rank, 2, port) for rank in range(2)], timeout=240)
    ratios = [peak / full_bytes for peak in peaks]
    print(f"host peak growth while loading, × full float32 copy ({full_bytes / 2**20:.0f} MiB): {ratios}")
    assert ratios[1] <= 0.6, ratios


@pytest.mark.vllm
def test_rollout_engine_log_probs_equal_the_learner_after_a_broadcast(group, model_dir):
    from orchestration.weight_sync import push_weights
    from rollout.group import RolloutGroup
    from rollout.types import SamplingConfig, samples_to_batch

    prompts = [[257, 72, 105, 10], [257, 49, 43, 49, 61], [257, 120], [257, 97, 98, 99, 100, 101, 102]]
    sampling = SamplingConfig(max_tokens=12, n=2, seed=0)
    with RolloutGroup(model_dir, 1, engine="vllm", engine_kwargs={"max_model_len": 256, "dtype": "float32"}) as rollout:
        before = samples_to_batch(rollout.generate(prompts, sampling), pad_token_id=256)
        learner_before = group.compute_log_probs(before)
        stale_gap = float(((learner_before - before.rollout_log_probs).abs() * before.response_mask).max())
        assert stale_gap > 1e-3, "the learner has trained: the initial engine weights must differ from its own"

        report = push_weights(group, rollout, policy_version=1, bucket_bytes=64 << 10)
        assert report["weight_sync/num_buckets"] > 1 and report["weight_sync/bytes"] > 0
        samples = rollout.generate(prompts, sampling)
        after = samples_to_batch(samples, pad_token_id=256)
        assert after.policy_version == 1
        learner_after = group.compute_log_probs(after)
    # the engine's log-probs and the learner's, each within float32 rounding of a float64 forward of the
    # learner's weights (tests/float64_checks.py): the engine serves exactly the pushed weights
    trained = load_reference_model(model_dir, group.full_state_dict()["model"])
    check_sample_log_probs(trained, samples)
    learner = [replace(s, log_probs=learner_after[i, : len(s.response_ids)]) for i, s in enumerate(samples)]
    check_sample_log_probs(trained, learner)


def _kill(rollout, rank: int) -> None:
    """SIGKILL rollout worker `rank` (as the fault drills do) and return once Ray sees its actor dead."""
    victim = rollout.workers[rank]
    os.kill(rollout.worker_info[rank]["pid"], signal.SIGKILL)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(victim.info.remote(), timeout=120)


@pytest.mark.vllm
@pytest.mark.filterwarnings("ignore:FIPO with one mini-batch")
def test_a_gloo_push_equals_an_object_store_push_and_survives_engines_lost_at_the_handshake_and_the_push(
    group, model_dir
):
    """rollout.weight_transfer gloo (learner rank 0 broadcasts through vLLM's weight-transfer API):

    1. against object_store: engine 0 gets the learner's weights one way, engine 1 the other, both from the model's
       own weights. Their samples for the same prompts and seeds are bit-identical, both engines report vLLM's
       weight version = the policy version, the gloo engine's log-probs are those of a float64 forward of the
       learner's weights, and a second push reuses the handshake. vLLM's WeightSource over the shards yields the
       state dict exactly (on the CPU, and on the learner's device as the nccl transport takes it).
    2. engine 1 SIGKILLed before a push to both: its handshake fails at once, learner rank 0 reports it without
       waiting for the group, engine 0 leaves the rendezvous at the group's timeout (rollout timeout_s: 10 s here);
       then engine 0 SIGKILLed as the next push is announced (the fault drills' hook). Each time the push restarts
       the lost engine, runs the handshake again and completes: both engines at the pushed version, nothing hung,
       the learner group still usable. Each kill waits until Ray sees the actor dead, so the order is fixed."""
    from orchestration.weight_sync import BroadcastPush, push_weights
    from rollout.group import RolloutGroup
    from rollout.types import SamplingConfig

    batch = random_batch(8, vocab_size=VOCAB_SIZE, seed=43)
    for _ in range(2):  # away from the model's own weights (the first step is the warm-up's, at learning rate 0)
        group.update(batch.replace(old_log_probs=torch.zeros_like(batch.rollout_log_probs)))
    prompts = [[257, 72, 105, 10], [257, 49, 43, 49, 61], [257, 120], [257, 97, 98, 99, 100, 101, 102]]
    sampling = SamplingConfig(max_tokens=12, n=2, seed=0)
    kwargs = {"max_model_len": 256, "dtype": "float32"}
    with RolloutGroup(model_dir, 2, engine="vllm", engine_kwargs=kwargs, max_restarts=1, timeout_s=10) as rollout:
        engines = list(rollout.workers)
        before = ray.get(engines[1].generate.remote(prompts, sampling))
        push_weights(group, rollout, policy_version=1, bucket_bytes=64 << 10, ranks=[0])
        gloo = BroadcastPush("gloo", bucket_bytes=64 << 10)
        report = gloo(group, rollout, policy_version=1, ranks=[1])
        assert report["weight_sync/bytes"] > 0 and report["weight_sync/handshakes"] == 1
        by_object_store, by_gloo = ray.get([e.generate.remote(prompts, sampling) for e in engines])
        assert [ray.get(e.info.remote())["policy_version"] for e in engines] == [1, 1]
        report = gloo(group, rollout, policy_version=2, ranks=[1])  # the same parties: no new handshake
        assert report["weight_sync/handshakes"] == 1
        assert ray.get(engines[1].info.remote())["policy_version"] == 2

        rollout.recover_weights = lambda ranks: None  # recovery on; the push itself redoes the lost engine's part
        restarts = []
        rollout.on_restart = lambda rank, phase, cause, lost_at: restarts.append((rank, phase))
        gloo = BroadcastPush("gloo", bucket_bytes=64 << 10)
        _kill(rollout, 1)
        report = gloo(group, rollout, policy_version=3)
        assert restarts == [(1, "update_weights")] and report["weight_sync/handshakes"] == 2
        assert rollout.workers[0] is engines[0] and rollout.workers[1] is not engines[1]
        announced = []

        def kill_once(phase, processes):
            if phase == "update_weights" and not announced:
                announced.append(phase)
                _kill(rollout, 0)

        rollout.on_submit = kill_once
        report = gloo(group, rollout, policy_version=4)
        assert announced and restarts == [(1, "update_weights"), (0, "update_weights")]
        assert report["weight_sync/handshakes"] == 3 and rollout.workers[0] is not engines[0]
        assert [ray.get(w.info.remote())["policy_version"] for w in rollout.workers] == [4, 4]
    group.ping()
    assert group.failed is None
    changed = [
        a.response_ids != b.response_ids or not torch.equal(a.log_probs, b.log_probs) for a, b in zip(before, by_gloo)
    ]
    assert all(changed), "the push left an engine's outputs as they were"
    for a, b in zip(by_object_store, by_gloo):
        assert a.response_ids == b.response_ids and torch.equal(a.log_probs, b.log_probs)
        assert a.policy_version == b.policy_version == 1
    check_sample_log_probs(load_reference_model(model_dir, group.full_state_dict()["model"]), by_gloo)

    def source_pairs(actor, on_device: bool) -> list:  # vLLM's WeightSource over the shards (nccl: on_device)
        from learner.transfer import BucketSource

        source = BucketSource(actor.worker, actor.worker.weight_bucket_plan(64 << 10), on_device=on_device)
        return [(m.name, m.dtype, m.shape) for m in source.metadata()], [(n, t) for n, t in source]

    state = group.full_state_dict()["model"]
    for on_device in (False, True):
        (meta, pairs), (_, rank1_pairs) = ray.get(
            [a.__ray_call__.remote(source_pairs, on_device) for a in group.actors]
        )
        assert meta == [(name, t.dtype, tuple(t.shape)) for name, t in state.items()]
        assert [n for n, _ in pairs] == list(state) and all(torch.equal(t, state[n]) for n, t in pairs)
        assert [n for n, _ in rank1_pairs] == list(state) and all(t is None for _, t in rank1_pairs)


def test_a_failing_rank_raises_in_the_driver_promptly(group, model_dir):
    """Rank 1 raises at once while rank 0 waits in a collective for it: the driver gets rank 1's error and
    traceback at once, and rank 0 gets out of its stuck collective after the process-group timeout."""
    good = random_batch(8, vocab_size=VOCAB_SIZE, seed=41)
    good = good.replace(old_log_probs=torch.zeros_like(good.rollout_log_probs))
    bad = good.replace(old_log_probs=None)
    timeout_s = make_config(model_dir).collective_timeout_s
    start = time.monotonic()
    with pytest.raises(LearnerRankError, match=r"(?s)rank 1 failed in update.*worker\.py.*ValueError: update needs"):
        group.call_per_rank("update", [((good,), {}), ((bad,), {})])
    # "at once": before rank 0's collective could time out (15 s), so the driver did not wait for it (rank 0 is
    # still unfinished below). Rank 1 fails before any collective, and the driver then looks 1 s for a dead peer
    # (LearnerGroup._dead_rank's grace): a few seconds also on a machine 5x slower than this one.
    assert time.monotonic() - start < timeout_s
    with pytest.raises(RuntimeError, match="unusable"):
        group.update(good)
    (stuck_rank0,) = group.unfinished
    with pytest.raises(ray.exceptions.RayTaskError):  # gloo's timeout (15 s) ends the stuck collective
        ray.get(stuck_rank0, timeout=timeout_s + 30)
    assert time.monotonic() - start < timeout_s + 30  # the timeout plus a hang margin (30 s)


def test_a_killed_rank_is_named_and_the_group_can_be_replaced(model_dir, tmp_path):
    """Rank 0's process SIGKILLed (by pid) right after an update is submitted (rank 0 held at a barrier before it,
    so the update cannot have finished before the kill): rank 1 fails at once in its collective, but the error
    names the rank that died; `failed` says so, shutdown() kills the survivor, and a new group with the same
    config works (what the trainer does before restoring a checkpoint)."""
    import os
    import signal

    config = make_config(model_dir)
    group = LearnerGroup(config, world_size=2, num_cpus_per_rank=1, call_timeout_s=120)
    batch = random_batch(8, vocab_size=VOCAB_SIZE, seed=51)
    batch = batch.replace(old_log_probs=torch.zeros_like(batch.rollout_log_probs))
    group.on_submit = lambda phase, processes: os.kill(processes[0][0], signal.SIGKILL)
    group.actors[0].__ray_call__.remote(held_until(str(tmp_path / "never")))  # rank 0 waits; the update queues
    start = time.monotonic()
    try:
        with pytest.raises(LearnerRankError, match=r"learner rank 0 died in update") as raised:
            group.update(batch)
        assert raised.value.rank == 0 and group.failed == "update: rank 0 died"
        # at once, not by the 15 s collective timeout: < 0.1 s here at a load average of 9 on 2 cores
        assert time.monotonic() - start < config.collective_timeout_s
    finally:
        group.shutdown()
    fresh = LearnerGroup(config, world_size=2, num_cpus_per_rank=1, call_timeout_s=120)
    try:
        assert len(fresh.update(batch)) == 1
    finally:
        fresh.shutdown()
