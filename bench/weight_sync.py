"""Weight sync throughput: learner (2 FSDP2 ranks, gloo) → object store → one vLLM CPU engine, against the raw
transport between the same two actors.

System: `orchestration.weight_sync.push_weights` (per bucket, the ranks gather their shards to rank 0, whose
task returns the bucket into the object store; the rollout worker fetches and loads each bucket into vLLM
while the next is gathered). Raw transport: the same
bucket sizes, already materialised in learner rank 0's actor, `ray.put` there and `ray.get` in the rollout
actor (no gathering, no loading). Both are timed `--repeats` times, alternating, after one warm-up; the
median counts. ratio = gb_per_s / raw_gb_per_s (goal ≥ 0.5). Prints one JSON line last.

    python -m bench.weight_sync [--hidden-size 512] [--layers 4] [--bucket-mb 16] [--repeats 5]
"""

from __future__ import annotations

from orchestration.cluster.env import use_local_defaults

use_local_defaults()

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import ray  # noqa: E402
import torch  # noqa: E402

from bench.common import device_info, git_commit, print_result  # noqa: E402
from learner.config import LearnerConfig  # noqa: E402
from learner.group import LearnerGroup  # noqa: E402
from orchestration.weight_sync import push_weights  # noqa: E402
from rollout.group import RolloutGroup  # noqa: E402
from rollout.tiny import build_tiny_model  # noqa: E402


def _make_buckets(actor_self, shapes: list[list[tuple[str, tuple[int, ...]]]]) -> int:
    """(Runs in learner rank 0's actor.) Materialise float32 buckets of the given shapes; returns bytes."""
    actor_self.bench_buckets = [[(n, torch.randn(s)) for n, s in bucket] for bucket in shapes]
    return sum(t.numel() * t.element_size() for b in actor_self.bench_buckets for _, t in b)


def _put_buckets(actor_self) -> list[ray.ObjectRef]:
    """(Runs in learner rank 0's actor.) `ray.put` each prepared bucket."""
    return [ray.put(bucket) for bucket in actor_self.bench_buckets]


def _get_buckets(actor_self, nested_refs: list[list[ray.ObjectRef]]) -> int:
    """(Runs in the rollout actor.) `ray.get` each bucket in turn, as the weight update does; returns bytes."""
    total = 0
    for ref in nested_refs[0]:
        bucket = ray.get(ref)
        total += sum(t.numel() * t.element_size() for _, t in bucket)
        del bucket
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--bucket-mb", type=int, default=16, help="bucket size, MiB")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    bucket_bytes = args.bucket_mb << 20

    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = str(
                build_tiny_model(
                    f"{tmp}/model",
                    hidden_size=args.hidden_size,
                    num_hidden_layers=args.layers,
                    num_attention_heads=args.hidden_size // 64,
                    num_key_value_heads=2,
                    intermediate_size=args.hidden_size * 11 // 4,
                )  # fmt: skip
            )
            config = LearnerConfig(model_dir=model_dir, mini_batch_samples=2, micro_batch_tokens=1024)
            learner = LearnerGroup(config, world_size=2)
            rollout = RolloutGroup(model_dir, 1, engine="vllm", engine_kwargs={"dtype": "float32"})
            try:
                result = run(learner, rollout, bucket_bytes, args.repeats)
            finally:
                rollout.shutdown()
                learner.shutdown()
    finally:
        ray.shutdown()
    result.update(
        bench="weight_sync",
        hidden_size=args.hidden_size,
        layers=args.layers,
        bucket_bytes=bucket_bytes,
        repeats=args.repeats,
        learner_world_size=2,
        rollout_workers=1,
        transport="ray object store",
        commit=git_commit(),
        **device_info(),
    )
    print_result(result)


def run(learner: LearnerGroup, rollout: RolloutGroup, bucket_bytes: int, repeats: int) -> dict:
    rank0, rollout_actor = learner.actors[0], rollout.workers[0]
    # The same bucket layout the system sends, as shapes, to build the raw transport's payload.
    buckets = learner.start_weight_buckets(bucket_bytes)
    shapes = [[(name, tuple(t.shape)) for name, t in ray.get(ref)] for ref in buckets.refs]
    learner.finish_weight_buckets(buckets)
    nbytes = buckets.nbytes
    del buckets
    raw_bytes = ray.get(rank0.__ray_call__.remote(_make_buckets, shapes))
    assert raw_bytes == nbytes, (raw_bytes, nbytes)

    system_s, raw_s = [], []
    for rep in range(repeats + 1):
        start = time.perf_counter()
        report = push_weights(learner, rollout, policy_version=rep + 1, bucket_bytes=bucket_bytes)
        seconds = time.perf_counter() - start

        raw_start = time.perf_counter()
        raw_refs = ray.get(rank0.__ray_call__.remote(_put_buckets))
        got = ray.get(rollout_actor.__ray_call__.remote(_get_buckets, [raw_refs]))
        raw_seconds = time.perf_counter() - raw_start
        del raw_refs
        assert got == nbytes
        if rep > 0:  # the first round is warm-up
            system_s.append(seconds)
            raw_s.append(raw_seconds)
        print(f"rep {rep}: system {seconds:.3f} s, raw {raw_seconds:.3f} s, {report}")
    seconds, raw_seconds = statistics.median(system_s), statistics.median(raw_s)
    return {
        "bytes": nbytes,
        "num_buckets": len(shapes),
        "seconds": round(seconds, 4),
        "gb_per_s": round(nbytes / seconds / 1e9, 4),
        "raw_seconds": round(raw_seconds, 4),
        "raw_gb_per_s": round(nbytes / raw_seconds / 1e9, 4),
        "ratio": round(raw_seconds / seconds, 4),
    }


if __name__ == "__main__":
    main()
