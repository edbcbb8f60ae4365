"""The learner as a group of Ray actors: `world_size` ranks that together hold one FSDP2-sharded model.

The only file of learner/ that touches Ray. Each actor wraps a plain `LearnerWorker` (learner/worker.py);
`ray.remote` is applied at runtime. All ranks join one `torch.distributed` process group (gloo on CPU, NCCL
on GPUs): the group picks rank 0's address and a free port and starts `init_process_group` on every rank at
once (sequential calls would deadlock), with a timeout so that stuck collectives raise.

Every group call sends the same method to all ranks and waits on all of them with a deadline: the first rank
that raises (or dies) makes the call raise `LearnerRankError` in the driver at once, with that rank's
traceback; the other ranks, stuck in a collective with the dead one, raise after the process-group timeout.
A group that failed is unusable (`failed` says why): `shutdown()` it (which kills every rank, also those
stuck in a collective) and build a new one, then restore a checkpoint into it; the trainer does that by
itself (orchestration/steps.py `recover_learner`).

Weights for the rollout engines leave through the object store, one bucket (`list[tuple[str, Tensor]]` of
full HF-named tensors) per task: every rank runs one gather task per bucket and rank 0's task returns the
bucket, so its ref exists before the bucket does and a rollout worker can load bucket k while the learner
gathers bucket k + 1 (`start_weight_buckets` / `finish_weight_buckets`; `orchestration/weight_sync.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
import torch

from actors import location
from advantage import RolloutBatch
from learner.config import LearnerConfig
from learner.distributed import free_port, init_distributed


class LearnerRankError(RuntimeError):
    """A learner rank raised or died; the message names the rank and the method and carries its traceback."""

    def __init__(self, message: str, *, rank: int, method: str) -> None:
        super().__init__(message)
        self.rank, self.method = rank, method


@dataclass(frozen=True)
class WeightBuckets:
    """A weight transfer in flight (see `LearnerGroup.start_weight_buckets`).

    refs: rank 0's buckets in order; each resolves to `list[tuple[str, Tensor]]` (HF names, full CPU tensors)
        as soon as the ranks have gathered it.
    nbytes: bytes of all buckets together (one full copy of the weights in the export dtype).
    rank_refs: every rank's per-bucket completion refs (the bucket's bytes; 0 off rank 0), rank-major.
    """

    refs: list[ray.ObjectRef]
    nbytes: int
    rank_refs: list[ray.ObjectRef]


class _LearnerActor:
    """The body of one learner actor: sets up its rank, then forwards calls to its LearnerWorker."""

    def __init__(self) -> None:
        self.worker = None

    def start(self, process_setup: Callable[[], Any] | None = None) -> dict:
        """Run `process_setup` (if any), import the heavy modules now (so that the rendezvous in `setup` is
        quick); return where this rank runs (actors.location: pid, node id, ip, GPU ids) and a free port."""
        if process_setup is not None:
            process_setup()
        import learner.worker  # noqa: F401

        return location() | {"port": free_port()}

    def setup(self, config: LearnerConfig, rank: int, world_size: int, master_addr: str, master_port: int) -> None:
        from learner.worker import LearnerWorker  # heavy: torch.distributed and FSDP2, in the rank's process only

        init_distributed(rank, world_size, master_addr, master_port, config.collective_timeout_s)
        self.worker = LearnerWorker(config)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.worker, method)(*args, **kwargs)

    def call_rank0(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Like `call`, but only rank 0 returns its result (None elsewhere: results that every rank holds,
        e.g. the [B, T] log-probs, travel once)."""
        result = getattr(self.worker, method)(*args, **kwargs)
        return result if self.worker.rank == 0 else None

    def gather_weight_bucket(self, names: list[str]) -> tuple[list, int]:
        """(bucket, its bytes): called with num_returns=2, so the driver can wait on the small second value
        without fetching the bucket (which only the rollout workers fetch)."""
        bucket = self.worker.gather_weight_bucket(names)
        return bucket, sum(t.numel() * t.element_size() for _, t in bucket)


class LearnerGroup:
    """`world_size` learner ranks as Ray actors. Methods mirror LearnerWorker's and return rank 0's result.

    Args:
        config: the learner config (identical on every rank).
        world_size: number of ranks (data-parallel FSDP2 shards).
        num_cpus_per_rank: Ray CPUs per actor (fractions allowed; Ray sets OMP_NUM_THREADS from it).
        num_gpus_per_rank: Ray GPUs per actor (1 on a GPU cluster: NCCL is used when CUDA is visible).
        call_timeout_s: deadline of every group call, seconds (a rank that takes longer raises TimeoutError).
        placement: placement(rank) → extra `ray.remote` options of rank `rank` (e.g. its bundle of the learner's
            placement group), called before the rank is started; it may wait (bounded) for the resources and
            raise, naming them, when they do not come.
        process_setup: a picklable callable each rank's process runs first (e.g. the CPU placement of
            orchestration/cluster/cpus.py).

    `on_submit(phase, processes)`, a hook the driver may install (fault drills), is called right after every
    call's tasks are submitted, with the LearnerWorker method (or "weight_buckets") and {rank: (pid, node_id)}.
    """

    def __init__(
        self,
        config: LearnerConfig,
        world_size: int,
        *,
        num_cpus_per_rank: float = 1,
        num_gpus_per_rank: float = 0,
        call_timeout_s: float = 1800.0,
        placement: Callable[[int], dict] | None = None,
        process_setup: Callable[[], Any] | None = None,
    ) -> None:
        self.config = config
        self.world_size = world_size
        self.call_timeout_s = call_timeout_s
        self._failed: str | None = None
        self.on_submit: Callable[[str, dict[int, tuple[int, str]]], None] | None = None
        self.unfinished: list[ray.ObjectRef] = []
        """After a failed call: the refs of the tasks that had not finished (ranks stuck in a collective with
        a failed rank raise after the process-group timeout; `ray.get` them to see it)."""
        remote_cls = ray.remote(_LearnerActor)
        self.actors: list[Any] = []
        try:
            for rank in range(world_size):
                options = {"num_cpus": num_cpus_per_rank, "num_gpus": num_gpus_per_rank}
                self.actors.append(remote_cls.options(**options, **(placement(rank) if placement else {})).remote())
            started = self._wait([a.start.remote(process_setup) for a in self.actors], "start")
            master_addr, master_port = started[0]["ip"], started[0]["port"]
            self.locations = [{key: where[key] for key in ("pid", "node_id", "ip", "gpu_ids")} for where in started]
            """Where each rank runs: {"pid", "node_id", "ip", "gpu_ids"} (actors.location)."""
            self.processes = {rank: (where["pid"], where["node_id"]) for rank, where in enumerate(started)}
            """{rank: (pid, Ray node id)} of the rank actors."""
            setups = [
                actor.setup.remote(config, rank, world_size, master_addr, master_port)
                for rank, actor in enumerate(self.actors)
            ]
            self._wait(setups, "setup")
        except BaseException:
            self.shutdown()
            raise

    # ------------------------------------------------------------------------------------------------------
    # calls

    def _wait(self, refs: list[ray.ObjectRef], what: str, ranks: list[int] | None = None) -> list:
        """Results of `refs` in order (refs[i] runs on rank `ranks[i]`; default rank i). Raises at the first
        rank error, or when the deadline passes, naming the rank(s); the group is then marked failed."""
        ranks = list(range(len(refs))) if ranks is None else ranks
        deadline = time.monotonic() + self.call_timeout_s
        index_of = {ref: i for i, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                late = sorted({ranks[index_of[ref]] for ref in pending})
                self._failed, self.unfinished = f"{what} timed out", list(pending)
                raise TimeoutError(f"learner {what}: ranks {late} did not finish within {self.call_timeout_s} s")
            for ref in ready:
                i = index_of[ref]
                try:
                    results[i] = ray.get(ref)
                except Exception as err:
                    rank, how, detail = ranks[i], "failed", f"{err}"
                    if isinstance(err, ray.exceptions.RayActorError):
                        how = "died"
                    elif dead := self._dead_rank(pending, [ranks[index_of[r]] for r in pending]):
                        # a killed rank's peers fail at once in their collectives: name the dead one
                        rank, how, detail = dead[0], "died", f"{dead[1]}\n(rank {ranks[i]} then failed: {err})"
                    self._failed, self.unfinished = f"{what}: rank {rank} {how}", list(pending)
                    raise LearnerRankError(
                        f"learner rank {rank} {how} in {what}:\n{detail}", rank=rank, method=what
                    ) from err
        return [results[i] for i in range(len(refs))]

    @staticmethod
    def _dead_rank(refs: list[ray.ObjectRef], ranks: list[int], grace_s: float = 1.0) -> tuple[int, Exception] | None:
        """(rank, its error) of a task among `refs` (on `ranks`) whose actor died, waiting `grace_s` for Ray to
        report it: when a rank is killed its peers' collectives fail at once, often before its death is seen."""
        if not refs:
            return None
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=grace_s)
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as err:
                return ranks[refs.index(ref)], err
            except Exception:
                continue
        return None

    @property
    def failed(self) -> str | None:
        """Why the group is unusable (a call failed or timed out, or it was shut down); None while usable."""
        return self._failed

    def _submitted(self, phase: str) -> None:
        if self.on_submit is not None:
            self.on_submit(phase, dict(self.processes))

    def _check_usable(self) -> None:
        if self._failed:
            raise RuntimeError(f"this LearnerGroup is unusable after an earlier failure ({self._failed})")

    def call(self, method: str, *args: Any, **kwargs: Any) -> list:
        """Call LearnerWorker.`method`(*args, **kwargs) on every rank; returns every rank's result."""
        return self.call_per_rank(method, [(args, kwargs)] * self.world_size)

    def call_per_rank(self, method: str, rank_args: list[tuple[tuple, dict]]) -> list:
        """Call LearnerWorker.`method` on every rank with that rank's (args, kwargs); returns every result."""
        self._check_usable()
        if len(rank_args) != self.world_size:
            raise ValueError(f"call_per_rank: {len(rank_args)} argument sets for {self.world_size} ranks")
        refs = [actor.call.remote(method, *args, **kwargs) for actor, (args, kwargs) in zip(self.actors, rank_args)]
        self._submitted(method)
        return self._wait(refs, method)

    def call_rank0(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call LearnerWorker.`method` on every rank; return rank 0's result (only it is sent back)."""
        self._check_usable()
        refs = [actor.call_rank0.remote(method, *args, **kwargs) for actor in self.actors]
        self._submitted(method)
        return self._wait(refs, method)[0]

    def ping(self) -> None:
        """Return when every rank answers; LearnerRankError naming a rank that died (the group is then failed)."""
        self._check_usable()
        self._wait([actor.__ray_ready__.remote() for actor in self.actors], "ping")

    def compute_log_probs(self, batch: RolloutBatch, *, reference: bool = False) -> torch.Tensor:
        """[B, T] float32 log-probs of the response tokens (see LearnerWorker.compute_log_probs)."""
        return self.call_rank0("compute_log_probs", ray.put(batch), reference=reference)

    def update(self, batch: RolloutBatch) -> list[dict[str, float]]:
        """One optimizer step per mini-batch; metrics per mini-batch (see LearnerWorker.update)."""
        return self.call_rank0("update", ray.put(batch))

    def save_checkpoint(self, path: str) -> None:
        """Sharded training state for an exact resume (a directory on storage every rank can reach)."""
        self.call("save_checkpoint", path)

    def load_checkpoint(self, path: str) -> None:
        self.call("load_checkpoint", path)

    def export_hf(self, path: str) -> None:
        """Hugging Face-format model directory (written by rank 0)."""
        self.call("export_hf", path)

    def full_state_dict(self, *, optimizer: bool = False) -> dict:
        """Full CPU state from rank 0 (see LearnerWorker.full_state_dict)."""
        return self.call_rank0("full_state_dict", optimizer=optimizer)

    # ------------------------------------------------------------------------------------------------------
    # weights for the rollout engines

    def start_weight_buckets(self, bucket_bytes: int) -> WeightBuckets:
        """Start gathering the full weights in buckets of about `bucket_bytes`; returns at once. Every rank
        gets one task per bucket (one collective each, in order); rank 0's task returns the bucket, which Ray
        stores in the object store, so `refs[k]` can be fetched anywhere as soon as bucket k is gathered while
        later buckets are still being gathered. Always follow with `finish_weight_buckets`."""
        plan = self.call_rank0("weight_bucket_plan", bucket_bytes)
        bucket_refs, done_refs = [], []
        for actor in self.actors:
            for names, _ in plan:
                bucket_ref, done_ref = actor.gather_weight_bucket.options(num_returns=2).remote(names)
                bucket_refs.append(bucket_ref)
                done_refs.append(done_ref)
        nbytes = sum(n for _, n in plan)
        self._submitted("weight_buckets")
        return WeightBuckets(refs=bucket_refs[: len(plan)], nbytes=nbytes, rank_refs=done_refs)

    def finish_weight_buckets(self, buckets: WeightBuckets) -> None:
        """Wait for every rank's bucket tasks (deadline; the first rank error raises LearnerRankError)."""
        per_rank = len(buckets.rank_refs) // self.world_size
        self._wait(buckets.rank_refs, "weight buckets", [r for r in range(self.world_size) for _ in range(per_rank)])

    def shutdown(self) -> None:
        """Kill the rank actors (also those stuck in a collective). Safe to call twice."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        self._failed = self._failed or "shut down"
