"""Weight sync: the learner's fresh weights into every rollout engine, once per step (policy version + 1).

Every transport goes through vLLM's RL weight-transfer API on the engines (`init_weight_transfer_engine` once,
then per push `start_weight_update`, the updates, `finish_weight_update(policy_version)`: vLLM's weight version
becomes the policy version, which the push checks). rollout.weight_transfer picks how the bytes travel:

* object_store (`push_weights`, the default): the learner cuts the weights into buckets of about
  `bucket_bytes`; for each bucket every rank sends its FSDP2 shards to rank 0 (one batch of point-to-point
  transfers, received straight into the full tensors) and rank 0's task returns the bucket as
  `list[tuple[str, Tensor]]` (Hugging Face names, full tensors), which Ray stores in the object store. The
  bucket refs exist before the buckets do, so they go to `RolloutGroup.update_weights` at once and its workers
  fetch, load and release one bucket at a time while the learner gathers the next. The engines' transport
  (rollout/weight_transfer.py) takes the bucket in-process. The refs can be kept (`keep`), so that an engine
  restarted while the learner has moved on (trainer.max_staleness 1) gets the same weights again.
* gloo (`BroadcastPush`): the trainer side of vLLM's API on the learner's ranks (learner/transfer.py): the
  ranks gather each bucket straight into one packed tensor on rank 0, which broadcasts it over a gloo group to
  every engine while it drives the engines through `rollout.group.EngineClient`. Nothing is kept.
* nccl (`BroadcastPush`, GPU clusters): the same trainer-side code with vLLM's own NCCL trainer engine, from the
  GPU; not run by this project (docs/weight_sync.md says what was and was not run).

The model is never held as one dictionary: at most a bucket or two per process (plus the object store's copy).
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


class BroadcastPush:
    """Pushes through a transport the learner drives (learner/transfer.py: `backend` "gloo" here, "nccl" on
    GPUs): learner rank 0 gathers each bucket from the FSDP2 shards and broadcasts it to the engines while it
    drives them through vLLM's API (start, the update, finish with the policy version).

    The handshake (vLLM's `init_weight_transfer_engine` on the engines, the group opened on rank 0) runs before
    the first push and again whenever the parties changed: a restarted engine, a rebuilt learner, a different
    set of target engines, or a failed push. A push that fails because engines were lost restarts them
    (`rollout.max_restarts`), repeats the handshake and sends again; any other failure raises.
    """

    def __init__(self, backend: str, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        self.backend = backend
        self.bucket_bytes = bucket_bytes
        self.parties: tuple | None = None
        """Who the current handshake joined (the learner's and the engines' actors), None when there is none."""
        self.handshakes = 0

    def _handshake(self, learner_group, rollout_group, ranks: list[int]) -> str | None:
        """Returns why the engines' side failed, or None."""
        self.handshakes += 1
        return learner_group.call_rank0(
            "init_weight_transfer",
            self.backend,
            client=rollout_group.transfer_client(ranks),
            bucket_bytes=self.bucket_bytes,
            master_address=learner_group.locations[0]["ip"],
            world_size=1 + len(ranks) * rollout_group.workers_per_engine,
            timeout_s=rollout_group.timeout_s,
        )

    def __call__(self, learner_group, rollout_group, policy_version: int, *, ranks: list[int] | None = None) -> dict:
        """Like `push_weights` (same arguments and report, plus "weight_sync/handshakes")."""
        ranks = list(range(rollout_group.num_workers)) if ranks is None else list(ranks)
        start, restarted = time.perf_counter(), 0
        while True:
            parties = (tuple(learner_group.actors), tuple(rollout_group.workers[r] for r in ranks))
            error = None
            if parties != self.parties:
                self.parties = None
                error = self._handshake(learner_group, rollout_group, ranks)
            if error is None:
                self.parties = parties
                rollout_group.transfer_client(ranks, announce=True)  # the push begins (fault drills)
                sent = learner_group.call_rank0("send_weights", policy_version)
                error = sent["error"]
            if error is None:
                break
            self.parties = None
            lost = rollout_group.replace_lost_workers(ranks, error, allowed=rollout_group.max_restarts - restarted)
            if not lost:
                raise RuntimeError(f"weight push of policy version {policy_version} failed: {error}")
            restarted += len(lost)
        rollout_group.policy_version = policy_version
        seconds = time.perf_counter() - start
        return {
            "weight_sync/bytes": sent["bytes"],
            "weight_sync/seconds": seconds,
            "weight_sync/gb_per_s": sent["bytes"] / seconds / 1e9,
            "weight_sync/num_buckets": sent["num_buckets"],
            "weight_sync/policy_version": policy_version,
            "weight_sync/handshakes": self.handshakes,
        }
