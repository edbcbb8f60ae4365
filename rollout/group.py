"""RolloutGroup: R RolloutWorker Ray actors; shards prompts over them and gathers samples in prompt order.

The only file of the rollout package that touches Ray. `ray.remote` is applied at runtime to the plain
`RolloutWorker` (extended here by two Ray-aware methods), so the worker stays testable without Ray.

Failure behaviour: every call waits with a bound (`timeout_s`). A worker that raises (a bug, a bad input)
surfaces at once as a RuntimeError in the caller carrying the worker's message and traceback; it is never
retried, since it would fail again. A worker that is lost (its process died: killed, OOM, os._exit; or it
missed the deadline) is handled in one of two ways:

* with recovery on (the driver installed `recover_weights` and `max_restarts` > 0): the worker is replaced by
  a fresh actor (same constructor arguments: `restart_worker`), brought to the current policy weights, and
  only its part of the call is submitted again: its shard of a `generate` (per-sample seeds depend on the
  global prompt index, so the samples are the ones the lost worker would have returned) or the same weight
  buckets of an `update_weights`. At most `max_restarts` restarts per call; one more loss ends the call
  with a RuntimeError naming the worker and the last error.
* without it: the call raises a RuntimeError as soon as Ray notices (seconds), and the group is marked
  broken and must be shut down.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError

from actors import Loss, location, supervise
from rollout.engine import PromptTooLongError, resolve_model_path
from rollout.types import Prompt, Sample, SamplingConfig
from rollout.worker import EngineKind, RolloutWorker

# Environment the workers need and that a Ray worker process may not inherit from the driver.
_FORWARDED_ENV = (
    "VLLM_ENABLE_V1_MULTIPROCESSING",
    "VLLM_CPU_KVCACHE_SPACE",
    "VLLM_CPU_OMP_THREADS_BIND",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
)


class _RayRolloutWorker(RolloutWorker):
    """RolloutWorker plus the Ray-aware methods: its process and node in `info`, weight buckets fetched lazily.
    `process_setup`, when given, runs first (before the engine starts its threads)."""

    def __init__(self, *args, process_setup: Callable[[], Any] | None = None, **kwargs) -> None:
        self.placement = process_setup() if process_setup is not None else None
        super().__init__(*args, **kwargs)

    def info(self) -> dict:
        return super().info() | location() | {"placement": self.placement}

    def update_weights_from_refs(self, nested_bucket_refs: list[list[ray.ObjectRef]], policy_version: int) -> dict:
        """`nested_bucket_refs[0]` lists refs of buckets `list[tuple[str, Tensor]]`; nested so that Ray passes the
        refs instead of resolving them all at once. Each bucket is fetched, loaded and released in turn."""
        (bucket_refs,) = nested_bucket_refs
        return self.update_weights_from_buckets((ray.get(ref) for ref in bucket_refs), policy_version)


def check_weight_versions(reported: dict[int, str], policy_version: int) -> None:
    """RuntimeError naming the engines whose own record (vLLM's weight version, {rank: version}) disagrees with
    the policy version just pushed."""
    stale = {rank: version for rank, version in reported.items() if version != str(policy_version)}
    if stale:
        raise RuntimeError(f"after the push of policy version {policy_version} the engines report {stale}")


class EngineClient:
    """vLLM's `VLLMWeightSyncClient` over our rollout workers: what learner rank 0 drives the engines with
    during a push through vLLM's API (learner/transfer.py). Picklable (it holds actor handles), so the driver
    hands it to the learner. Every call goes to every engine and waits for all with a deadline (vLLM's own Ray
    client waits forever); an engine that died or failed raises here, in the learner, which reports it."""

    def __init__(self, workers: Sequence[Any], timeout_s: float, workers_per_engine: int = 1) -> None:
        self.workers = list(workers)
        self.timeout_s = timeout_s
        self.workers_per_engine = workers_per_engine
        self.weight_version: str | None = None
        """The version `finish_weight_update()` sets when called without one (vLLM's NCCL sender does that)."""

    def _all(self, method: str, *args: Any) -> list:
        return ray.get([getattr(worker, method).remote(*args) for worker in self.workers], timeout=self.timeout_s)

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        """The handshake; a transport's group ranks (`rank_offset`) are counted over the engines in order (each
        engine is its own vLLM instance, with its workers ranked from its offset)."""
        offset = init_info.get("rank_offset")
        infos = [
            init_info if offset is None else init_info | {"rank_offset": offset + i * self.workers_per_engine}
            for i in range(len(self.workers))
        ]
        refs = [worker.init_weight_transfer.remote(info) for worker, info in zip(self.workers, infos)]
        ray.get(refs, timeout=self.timeout_s)

    def start_weight_update(self) -> None:
        self._all("start_weight_update")

    def update_weights(self, update_info: dict | list[dict]) -> None:
        self._all("receive_weights", update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        version = weight_version if weight_version is not None else self.weight_version
        reported = self._all("finish_weight_update", int(version))
        check_weight_versions(dict(enumerate(reported)), int(version))


def shard_prompts(num_prompts: int, num_workers: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of whole prompts, sizes differing by at most one; empty ones dropped."""
    base, extra = divmod(num_prompts, num_workers)
    ranges, start = [], 0
    for rank in range(num_workers):
        end = start + base + (1 if rank < extra else 0)
        if end > start:
            ranges.append((start, end))
        start = end
    return ranges


class RolloutGroup:
    """R rollout workers (Ray actors), each hosting one engine.

    model_path:          Hugging Face model directory (checked here, so a typo fails in the caller).
    num_workers:         R, the number of engines.
    engine:              "vllm", "hf" or "auto" (see rollout.worker.make_engine).
    engine_kwargs:       passed to each engine (dtype, max_model_len, tensor_parallel_size, logprobs_mode, ...).
    num_cpus_per_worker: Ray logical CPUs per actor (fractional is fine on a small box).
    num_gpus_per_worker: Ray GPUs per actor (= tensor_parallel_size on a GPU cluster; 0 on CPU).
    timeout_s:           the longest a generate / update_weights call may take before a RuntimeError.
    start_timeout_s:     the longest engine start may take.
    max_restarts:        restarts of lost workers allowed per call when recovery is on (see the module doc).
    process_setup:       a picklable callable each worker process runs first, also after a restart (e.g. the
                         CPU binding of orchestration/cluster/cpus.py); its result is `info()["placement"]`.
    placement:           placement(rank) → extra `ray.remote` options of worker `rank` (e.g. its placement
                         group's bundle), called before the worker is started and before every restart; it may
                         wait (bounded) for the worker's resources and raise, naming them, when they do not come.

    Hooks the driver may install (attributes, None by default):
    recover_weights(ranks): bring the (restarted) workers `ranks` to the current policy weights, e.g. by
        pushing the learner's weights to them alone (`update_weights(..., ranks=ranks)`). Installing it turns
        recovery on.
    on_submit(phase, processes): called right after a call's remote tasks are submitted, with the phase
        ("generate" | "update_weights") and {rank: (pid, node_id)} of the workers that got one (fault drills).
    on_restart(rank, phase, cause, lost_at): called after a lost worker was replaced and its part resubmitted;
        `lost_at` is the time.monotonic() at which the loss was seen.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        num_workers: int = 1,
        *,
        engine: EngineKind = "vllm",
        engine_kwargs: dict | None = None,
        num_cpus_per_worker: float = 1.0,
        num_gpus_per_worker: float = 0.0,
        timeout_s: float = 600.0,
        start_timeout_s: float = 300.0,
        max_restarts: int = 0,
        process_setup: Callable[[], Any] | None = None,
        placement: Callable[[int], dict] | None = None,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"RolloutGroup needs num_workers >= 1, got {num_workers}")
        model_path = resolve_model_path(model_path)
        if not ray.is_initialized():
            raise RuntimeError("RolloutGroup needs a running Ray (call ray.init first)")
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self.max_restarts = max_restarts
        self.restarts = 0
        """Workers replaced so far (over the group's life)."""
        self.policy_version = 0
        """The version of the last weights every targeted worker loaded (0: the model's own weights)."""
        self.recover_weights: Callable[[list[int]], None] | None = None
        self.on_submit: Callable[[str, dict[int, tuple[int, str]]], None] | None = None
        self.on_restart: Callable[[int, str, str, float], None] | None = None
        self._broken: str | None = None
        env_vars = {key: os.environ[key] for key in _FORWARDED_ENV if key in os.environ}
        actor_cls = ray.remote(
            num_cpus=num_cpus_per_worker,
            num_gpus=num_gpus_per_worker,
            max_restarts=0,
            runtime_env={"env_vars": env_vars},
        )(_RayRolloutWorker)

        def new_worker(rank: int) -> Any:
            options = placement(rank) if placement is not None else {}
            return actor_cls.options(**options).remote(
                model_path, engine=engine, process_setup=process_setup, **(engine_kwargs or {})
            )

        self._new_worker = new_worker
        self.workers: list[Any] = []
        try:
            for rank in range(num_workers):
                self.workers.append(self._new_worker(rank))
            infos = self._call(
                "start", lambda rank: self.workers[rank].info.remote(), range(num_workers), start_timeout_s
            )
        except BaseException:
            self.shutdown()
            raise
        self.worker_info = [infos[rank] for rank in range(num_workers)]
        self.workers_per_engine = int((engine_kwargs or {}).get("tensor_parallel_size", 1))
        """vLLM workers per engine (its tensor-parallel size): each is one rank of a broadcast transport."""
        self.pad_token_id = self.worker_info[0]["pad_token_id"]
        self.max_model_len = self.worker_info[0]["max_model_len"]

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    def restart_worker(self, rank: int) -> None:
        """Replace worker `rank` by a fresh actor (same constructor arguments, so the model's own weights: bring
        it to the policy's with `update_weights(..., ranks=[rank])`) and wait until its engine has started."""
        ray.kill(self.workers[rank])
        try:
            self.workers[rank] = self._new_worker(rank)
        except Exception as error:  # its resources did not come back (placement): the group cannot go on
            self._broken = f"worker {rank} could not be placed"
            raise RuntimeError(f"rollout worker {rank} could not be restarted: {error}") from error
        try:
            self.worker_info[rank] = ray.get(self.workers[rank].info.remote(), timeout=self.start_timeout_s)
        except RayError as error:
            self._broken = f"worker {rank} could not be restarted"
            raise RuntimeError(f"rollout worker {rank} could not be restarted: {error}") from error
        self.restarts += 1

    def _call(
        self,
        what: str,
        submit: Callable[[int], ray.ObjectRef],
        ranks: Sequence[int],
        timeout_s: float,
        *,
        needs_weights: bool = False,
    ) -> dict[int, Any]:
        """{rank: result of the task `submit(rank)` submits to worker `rank`} for every rank in `ranks`.

        A worker that raises ends the call at once (RuntimeError with its traceback). A lost worker (dead, or
        past the deadline) is restarted and its task submitted again while recovery is on and the call has
        restarts left (first brought to the current weights when `needs_weights`); otherwise the call raises
        and the group is marked broken."""
        if self._broken:
            raise RuntimeError(f"RolloutGroup is unusable after an earlier failure: {self._broken}")
        allowed = self.max_restarts if self.recover_weights is not None else 0

        def replace(rank: int) -> None:
            self.restart_worker(rank)
            if needs_weights:
                self.recover_weights([rank])

        def give_up(lost: list[Loss], restarted: int) -> RuntimeError:
            self._broken = "; ".join(f"worker {loss.worker} {loss.cause.splitlines()[0]}" for loss in lost)
            budget = f" ({restarted} restart(s) in this call, max_restarts={allowed})" if allowed else ""
            return RuntimeError("; ".join(f"rollout worker {loss.worker} {loss.cause}" for loss in lost) + budget)

        def task_error(rank: int, error: RayTaskError) -> Exception:  # its message first, then its traceback
            cause = error.cause if isinstance(error.cause, BaseException) else error
            if isinstance(cause, PromptTooLongError):  # bad input, not a bug: the caller names the row
                return cause
            return RuntimeError(
                f"rollout worker {rank} failed during {what}: {type(cause).__name__}: {cause}\n"
                f"worker traceback:\n{error}"
            )

        return supervise(
            what,
            ranks,
            submit,
            replace,
            give_up,
            timeout_s=timeout_s,
            max_restarts=allowed,
            lost_errors=(RayError,),  # the worker process died (RayActorError) or its result was lost
            timed_out=f"{what} timed out after {timeout_s:.0f} s",
            died=f"died during {what}",
            task_error=task_error,
            process_of=lambda rank: (self.worker_info[rank]["pid"], self.worker_info[rank]["node_id"]),
            on_submit=self.on_submit,
            on_restart=self.on_restart,
        )

    def generate(
        self, prompts: Sequence[Prompt], sampling: SamplingConfig, *, timeout_s: float | None = None
    ) -> list[Sample]:
        """n samples per prompt over all workers (whole prompts per worker), returned in prompt order."""
        if len(prompts) == 0:
            raise ValueError("generate: empty batch (no prompts)")
        shards = shard_prompts(len(prompts), self.num_workers)

        def submit(rank: int) -> ray.ObjectRef:
            start, end = shards[rank]
            return self.workers[rank].generate.remote(list(prompts[start:end]), sampling, start)

        per_worker = self._call("generate", submit, range(len(shards)), timeout_s or self.timeout_s, needs_weights=True)
        return [sample for rank in range(len(shards)) for sample in per_worker[rank]]

    def update_weights(
        self,
        bucket_refs: list[ray.ObjectRef],
        policy_version: int,
        *,
        ranks: Sequence[int] | None = None,
        timeout_s: float | None = None,
    ) -> list[dict]:
        """Every worker (or the workers `ranks`) streams the buckets (each ref holds `list[tuple[str, Tensor]]`,
        Hugging Face names, full tensors) into its engine, one at a time. A worker lost on the way is restarted
        and gets the same buckets again (they stay in the object store until the caller releases the refs).
        Returns per targeted worker {"bytes", "seconds", "num_buckets", "weight_version"}; every engine's
        weight version (vLLM's, set by the update's finish) must be `policy_version`, or RuntimeError."""
        if len(bucket_refs) == 0:
            raise ValueError("update_weights: no weight buckets")
        ranks = range(self.num_workers) if ranks is None else ranks

        def submit(rank: int) -> ray.ObjectRef:
            return self.workers[rank].update_weights_from_refs.remote([list(bucket_refs)], policy_version)

        stats = self._call("update_weights", submit, ranks, timeout_s or self.timeout_s)
        check_weight_versions({rank: stats[rank]["weight_version"] for rank in ranks}, policy_version)
        self.policy_version = policy_version
        return [stats[rank] for rank in ranks]

    # A push driven from the learner's side (orchestration/weight_sync.py, BroadcastPush)
    def transfer_client(self, ranks: Sequence[int], *, announce: bool = False) -> EngineClient:
        """The client learner rank 0 drives the engines `ranks` with (call deadline: `timeout_s`); `announce`
        reports a push to `on_submit` as an "update_weights" (fault drills)."""
        if self._broken:
            raise RuntimeError(f"RolloutGroup is unusable after an earlier failure: {self._broken}")
        if announce and self.on_submit is not None:
            self.on_submit(
                "update_weights", {r: (self.worker_info[r]["pid"], self.worker_info[r]["node_id"]) for r in ranks}
            )
        return EngineClient([self.workers[r] for r in ranks], self.timeout_s, self.workers_per_engine)

    def replace_lost_workers(self, ranks: Sequence[int], cause: str, *, allowed: int) -> list[int]:
        """After a failed push: restart the workers among `ranks` whose actor died (`cause` says why the push
        failed) and end the update on the others (their layers complete so far keep the new values: push
        again). Returns the restarted ranks; RuntimeError when more than `allowed` were lost (the push's share
        of `max_restarts`) or recovery is off."""
        lost_at = time.monotonic()
        lost, refs = [], {rank: self.workers[rank].abort_weight_update.remote() for rank in ranks}
        for rank, ref in refs.items():
            try:  # a survivor may first have to leave a handshake's rendezvous (up to timeout_s), then abort
                ray.get(ref, timeout=2 * self.timeout_s)
            except RayTaskError as error:
                raise RuntimeError(f"rollout worker {rank} could not end the failed update: {error}") from error
            except RayError:
                lost.append(rank)
        if lost and (len(lost) > allowed or self.recover_weights is None):
            self._broken = f"workers {lost} lost during a weight push"
            raise RuntimeError(
                f"rollout workers {lost} were lost during a weight push ({cause}); max_restarts={self.max_restarts}"
            )
        for rank in lost:
            self.restart_worker(rank)
            if self.on_restart is not None:
                self.on_restart(rank, "update_weights", f"died during update_weights: {cause}", lost_at)
        return lost

    def shutdown(self) -> None:
        """Stop the engines and kill the actors (safe to call twice)."""
        alive = []
        for worker in self.workers:
            try:
                alive.append(worker.shutdown.remote())
            except RayError:
                pass
        if alive:
            ray.wait(alive, num_returns=len(alive), timeout=30)
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []

    def __enter__(self) -> RolloutGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
