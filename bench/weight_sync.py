"""Weight sync: seconds per push from the learner (2 FSDP2 ranks, gloo) into 1 or 2 vLLM CPU engines, by transport,
each against its raw transport (the same bytes moved between the same actors without vLLM or the gather).

    python -m bench.weight_sync [--model tiny|qwen2.5-0.5b] [--engines 1 2] [--bucket-mb 64] [--repeats 3]

Transports (rollout.weight_transfer; both go through vLLM's RL weight-transfer API on the engines):
* object_store: `orchestration.weight_sync.push_weights`: per bucket the ranks gather their shards to rank 0,
  whose task returns the bucket into Ray's object store; every engine fetches and loads it while the next is
  gathered. Raw: the same buckets, already materialised in rank 0's actor, `ray.put` there and `ray.get` by
  every engine actor.
* gloo: `orchestration.weight_sync.BroadcastPush("gloo")`: the ranks gather each bucket straight into one uint8
  tensor on rank 0, which broadcasts it over a gloo group to every engine, which loads it (learner/transfer.py).
  Raw: the same packed buckets, prepared in rank 0's actor, broadcast over a gloo group between the same actors
  and received into fresh buffers.

Models: `tiny` (rollout.tiny defaults) or `qwen2.5-0.5b`: the shape of conf/model/shapes/Qwen--Qwen2.5-0.5B.json
(hidden 896, 24 layers, 14/2 heads, MLP 4864, vocabulary 151,936, tied embeddings) with random bfloat16 weights,
as Qwen2.5's checkpoints: the learner (float32 master weights) exports bfloat16, 0.99 GB per push, and the
engines run bfloat16.
Per engine count and transport: the median of `--repeats` pushes after one warm-up (the handshake's push),
alternating transports. Prints a table, then one JSON line.
"""

from __future__ import annotations

from orchestration.cluster.env import use_local_defaults

use_local_defaults()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import ray  # noqa: E402
import torch  # noqa: E402

from bench.common import device_info, git_commit, print_result  # noqa: E402
from learner.config import LearnerConfig  # noqa: E402
from learner.distributed import free_port  # noqa: E402
from learner.group import LearnerGroup  # noqa: E402
from orchestration.weight_sync import BroadcastPush, push_weights  # noqa: E402
from rollout.group import RolloutGroup  # noqa: E402
from rollout.tiny import build_tiny_model  # noqa: E402

SHAPES = Path(__file__).resolve().parents[1] / "conf" / "model" / "shapes"


def model_args(model: str) -> dict:
    if model == "tiny":
        return {}
    shape = json.loads((SHAPES / "Qwen--Qwen2.5-0.5B.json").read_text())
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")
    return {key: shape[key] for key in keys} | {
        "vocab_size": shape["vocab_size"],
        "tie_word_embeddings": shape["tie_word_embeddings"],
        "dtype": shape["torch_dtype"],
    }


def _make_buckets(actor_self, shapes: list[list[tuple[str, tuple[int, ...]]]], dtype: torch.dtype) -> int:
    """(Learner rank 0's actor.) Materialise buckets of the given shapes; returns their bytes."""
    actor_self.bench_buckets = [[(n, torch.randn(s).to(dtype)) for n, s in bucket] for bucket in shapes]
    actor_self.bench_packed = [  # each bucket's tensors back to back, as the gloo transport gathers them
        torch.cat([t.view(-1).view(torch.uint8) for _, t in bucket]) for bucket in actor_self.bench_buckets
    ]
    return sum(t.numel() * t.element_size() for b in actor_self.bench_buckets for _, t in b)


def _put_buckets(actor_self) -> list[ray.ObjectRef]:
    """(Learner rank 0's actor.) `ray.put` each prepared bucket."""
    return [ray.put(bucket) for bucket in actor_self.bench_buckets]


def _get_buckets(actor_self, nested_refs: list[list[ray.ObjectRef]]) -> int:
    """(An engine's actor.) `ray.get` each bucket in turn, as the object_store push does; returns bytes."""
    total = 0
    for ref in nested_refs[0]:
        bucket = ray.get(ref)
        total += sum(t.numel() * t.element_size() for _, t in bucket)
        del bucket
    return total


def _free_port(actor_self) -> int:
    """(Any actor.) A free port on its node."""
    return free_port()


def _open_group(actor_self, host: str, port: int, rank: int, world_size: int) -> None:
    """(Any actor.) Join a stateless gloo group (vLLM's helper, as the gloo transport does)."""
    from datetime import timedelta

    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    actor_self.bench_group = stateless_init_torch_distributed_process_group(
        host, port, rank, world_size, "gloo", timeout=timedelta(seconds=600)
    )


def _broadcast(actor_self, sizes: list[int]) -> int:
    """(Any actor in the group.) Rank 0 sends each prepared packed bucket; the others receive into fresh
    buffers. Returns the bytes moved."""
    import torch.distributed as dist

    options = dist.BroadcastOptions()
    options.rootRank = 0
    total = 0
    for i, size in enumerate(sizes):
        if hasattr(actor_self, "bench_packed"):  # rank 0
            packed = actor_self.bench_packed[i]
        else:
            packed = torch.empty(size, dtype=torch.uint8)
        actor_self.bench_group.broadcast([packed], options).wait()
        total += packed.numel()
    return total


def measure(learner: LearnerGroup, rollout: RolloutGroup, bucket_bytes: int, repeats: int) -> list[dict]:
    rank0, engines = learner.actors[0], rollout.workers
    buckets = learner.start_weight_buckets(bucket_bytes)
    shapes = [[(name, tuple(t.shape)) for name, t in ray.get(ref)] for ref in buckets.refs]
    dtype = ray.get(buckets.refs[0])[0][1].dtype
    learner.finish_weight_buckets(buckets)
    nbytes = buckets.nbytes
    del buckets
    assert ray.get(rank0.__ray_call__.remote(_make_buckets, shapes, dtype)) == nbytes
    sizes = [sum(torch.Size(s).numel() * dtype.itemsize for _, s in bucket) for bucket in shapes]

    host, port = learner.locations[0]["ip"], ray.get(rank0.__ray_call__.remote(_free_port))
    world = 1 + len(engines)
    ray.get(
        [rank0.__ray_call__.remote(_open_group, host, port, 0, world)]
        + [e.__ray_call__.remote(_open_group, host, port, 1 + i, world) for i, e in enumerate(engines)]
    )

    def raw_object_store() -> None:
        refs = ray.get(rank0.__ray_call__.remote(_put_buckets))
        assert all(got == nbytes for got in ray.get([e.__ray_call__.remote(_get_buckets, [refs]) for e in engines]))

    def raw_gloo() -> None:
        moved = ray.get([a.__ray_call__.remote(_broadcast, sizes) for a in [rank0, *engines]])
        assert all(m == nbytes for m in moved), moved

    gloo = BroadcastPush("gloo", bucket_bytes)
    version = iter(range(1, 10_000))
    runs = {
        "object_store": lambda: push_weights(learner, rollout, next(version), bucket_bytes=bucket_bytes),
        "object_store raw": raw_object_store,
        "gloo": lambda: gloo(learner, rollout, next(version)),
        "gloo raw": raw_gloo,
    }
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(repeats + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            took = time.perf_counter() - start
            print(f"engines {len(engines)} round {rep} {name}: {took:.3f} s", flush=True)
            if rep > 0:  # the first round is warm-up (and the gloo push's handshake)
                seconds[name].append(took)
    rows = []
    for name in runs:
        median = statistics.median(seconds[name])
        rows.append(
            {
                "engines": len(engines),
                "transport": name,
                "seconds": round(median, 4),
                "gb_per_s": round(nbytes / median / 1e9, 4),
                "bytes_per_engine": nbytes,
                "num_buckets": len(shapes),
                "all_seconds": [round(s, 4) for s in seconds[name]],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "qwen2.5-0.5b"), default="tiny")
    parser.add_argument("--engines", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--bucket-mb", type=int, default=64, help="bucket size, MiB (learner.weight_bucket_mb)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    bucket_bytes = args.bucket_mb << 20

    ray.init(address="local", num_cpus=2 + 2 * max(args.engines), include_dashboard=False)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = str(build_tiny_model(f"{tmp}/model", **model_args(args.model)))
            config = LearnerConfig(model_dir=model_dir, mini_batch_samples=2, micro_batch_tokens=1024)
            learner = LearnerGroup(config, world_size=2)
            try:
                for engines in args.engines:
                    kwargs = {"max_model_len": 512}  # the checkpoint's dtype
                    with RolloutGroup(model_dir, engines, engine="vllm", engine_kwargs=kwargs) as rollout:
                        rows += measure(learner, rollout, bucket_bytes, args.repeats)
            finally:
                learner.shutdown()
    finally:
        ray.shutdown()
    print(f"\n{'engines':>7}  {'transport':<17} {'s/push':>8} {'GB/s':>7}  {'vs object_store':>15}  {'vs its raw':>10}")
    for row in rows:
        base = next(r for r in rows if r["engines"] == row["engines"] and r["transport"] == "object_store")
        raw = next(
            (r for r in rows if r["engines"] == row["engines"] and r["transport"] == f"{row['transport']} raw"), None
        )
        vs_raw = f"{raw['seconds'] / row['seconds']:.2f}" if raw else ""
        print(
            f"{row['engines']:>7}  {row['transport']:<17} {row['seconds']:>8.3f} {row['gb_per_s']:>7.3f}  "
            f"{base['seconds'] / row['seconds']:>15.2f}  {vs_raw:>10}"
        )
    print_result(
        {
            "bench": "weight_sync",
            "model": args.model,
            "bucket_bytes": bucket_bytes,
            "repeats": args.repeats,
            "learner_world_size": 2,
            "rows": rows,
            "commit": git_commit(),
            **device_info(),
        }
    )


if __name__ == "__main__":
    main()
