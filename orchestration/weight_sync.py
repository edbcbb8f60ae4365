"""Weight sync: the learner's fresh weights into every rollout engine, once per step (policy version + 1).

Transport on CPU (and the default everywhere): the Ray object store. The learner cuts the weights into
buckets of about `bucket_bytes`; for each bucket every rank sends its FSDP2 shards to rank 0 (one batch of
point-to-point transfers, received straight into the full tensors) and rank 0's task returns the bucket as
`list[tuple[str, Tensor]]` (Hugging Face names, full tensors), which Ray stores in the object store. The
bucket refs exist before the buckets do, so they go to `RolloutGroup.update_weights` at once and its workers
fetch, load and release one bucket at a time while the learner gathers the next: gathering and loading
overlap. The model is never held as one dictionary: at most the object store's one copy plus a bucket or two
per process.
Each engine loads the buckets through vLLM's RL weight-transfer API with our transport (rollout/weight_transfer.py)
and reports vLLM's weight version after the push, which must equal `policy_version` (RolloutGroup checks it).

GPU design (not run here: no GPU on the development machine). The object-store path works unchanged on GPUs
(rank 0 copies each gathered bucket to host memory; the engines copy it back to the device), at roughly
host-memory bandwidth, which is fine for models of a few billion parameters. Beyond that the transfer should
stay on the GPUs: vLLM 0.32's native weight-transfer API (`vllm/config/weight_transfer.py`,
`vllm/distributed/weight_transfer/`; worker methods `init_weight_transfer_engine` / `start_weight_update`)
with its `nccl` backend sets up one NCCL group spanning learner rank 0 and every engine's workers; rank 0
then broadcasts each gathered bucket from GPU memory while the engines run the same layer-wise reload that
`update_weights` runs here. Only the transport changes: the bucket iterator
(`LearnerWorker.iter_weight_buckets`) and the engine-side reload stay the same, so `push_weights` would take
a transport argument. Untested: whether vLLM 0.32's nccl backend accepts a trainer group whose rank 0 lives
in a Ray actor that is also in the learner's own FSDP process group (two NCCL communicators in one process
is normal, but the rendezvous must not collide with MASTER_PORT).
"""

from __future__ import annotations

import time

DEFAULT_BUCKET_BYTES = 256 << 20


def push_weights(
    learner_group,
    rollout_group,
    policy_version: int,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ranks: list[int] | None = None,
    keep: list | None = None,
) -> dict:
    """Send the learner's current weights to every rollout engine (or only to the engines `ranks`, e.g. one
    just restarted); later samples carry `policy_version`.

    The learner gathers bucket k + 1 while the engines fetch and load bucket k (every bucket is its own
    task on the learner ranks, whose result ref exists before the bucket does).

    Args:
        learner_group: a learner.group.LearnerGroup.
        rollout_group: a rollout.group.RolloutGroup.
        policy_version: the version the new weights get (the caller's previous version + 1).
        bucket_bytes: target size of one object-store bucket, bytes.
        ranks: the rollout workers to update; None = all.
        keep: a list that receives the bucket refs (which keeps these weights in the object store, so that a
            restarted engine can get them again without asking the learner; see `Run.recover_weights`).
    Returns: {"weight_sync/bytes": bytes of one full copy, "weight_sync/seconds": wall time from the first
        gather to the last engine's finished load, "weight_sync/gb_per_s": bytes / seconds / 1e9,
        "weight_sync/num_buckets", "weight_sync/policy_version"}.
    """
    start = time.perf_counter()
    buckets = learner_group.start_weight_buckets(bucket_bytes)
    try:
        rollout_group.update_weights(buckets.refs, policy_version, ranks=ranks)
    finally:  # a learner rank's failure is the root cause of a failed load: raise it first
        learner_group.finish_weight_buckets(buckets)
    if keep is not None:
        keep[:] = buckets.refs
    seconds = time.perf_counter() - start
    return {
        "weight_sync/bytes": buckets.nbytes,
        "weight_sync/seconds": seconds,
        "weight_sync/gb_per_s": buckets.nbytes / seconds / 1e9,
        "weight_sync/num_buckets": len(buckets.refs),
        "weight_sync/policy_version": policy_version,
    }
