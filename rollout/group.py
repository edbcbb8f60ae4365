"""RolloutGroup: R RolloutWorker Ray actors; shards prompts over them and gathers samples in prompt order.

The only file of the rollout package that touches Ray. `ray.remote` is applied at runtime to the plain
`RolloutWorker` (extended here by one method that resolves object refs), so the worker stays testable
without Ray.

Failure behaviour: every call waits with a bound (`timeout_s`). A worker that raises surfaces as a
RuntimeError in the caller carrying the worker's message; a worker that dies (killed, OOM, os._exit) surfaces
as a RuntimeError as soon as Ray notices (seconds). After a timeout the late worker may still be busy: the
group is marked broken and must be shut down.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from rollout.engine import resolve_model_path
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
    """RolloutWorker plus the one Ray-aware method: fetch weight buckets from the object store lazily."""

    def update_weights_from_refs(self, nested_bucket_refs: list[list[ray.ObjectRef]], policy_version: int) -> dict:
        """`nested_bucket_refs[0]` lists refs of buckets `list[tuple[str, Tensor]]`; nested so that Ray passes the
        refs instead of resolving them all at once. Each bucket is fetched, loaded and released in turn."""
        (bucket_refs,) = nested_bucket_refs
        return self.update_weights_from_buckets((ray.get(ref) for ref in bucket_refs), policy_version)


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
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"RolloutGroup needs num_workers >= 1, got {num_workers}")
        model_path = resolve_model_path(model_path)
        if not ray.is_initialized():
            raise RuntimeError("RolloutGroup needs a running Ray (call ray.init first)")
        self.timeout_s = timeout_s
        self._broken: str | None = None
        env_vars = {key: os.environ[key] for key in _FORWARDED_ENV if key in os.environ}
        actor_cls = ray.remote(
            num_cpus=num_cpus_per_worker,
            num_gpus=num_gpus_per_worker,
            max_restarts=0,
            runtime_env={"env_vars": env_vars},
        )(_RayRolloutWorker)
        self.workers = [
            actor_cls.remote(model_path, engine=engine, **(engine_kwargs or {})) for _ in range(num_workers)
        ]
        try:
            self.worker_info = self._gather([w.info.remote() for w in self.workers], "start", start_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        self.pad_token_id = self.worker_info[0]["pad_token_id"]
        self.max_model_len = self.worker_info[0]["max_model_len"]

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    def _gather(self, refs: list[ray.ObjectRef], what: str, timeout_s: float) -> list:
        """Results of one ref per worker, in worker order; the first failure raises at once."""
        if self._broken:
            raise RuntimeError(f"RolloutGroup is unusable after an earlier failure: {self._broken}")
        results: dict[ray.ObjectRef, object] = {}
        pending = list(refs)
        deadline = time.monotonic() + timeout_s
        while pending:
            remaining = deadline - time.monotonic()
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(remaining, 0.0))
            if not ready:
                ranks = [refs.index(r) for r in pending]
                self._broken = f"{what} timed out after {timeout_s:.0f} s on worker(s) {ranks}"
                raise RuntimeError(f"rollout {self._broken}")
            for ref in ready:
                rank = refs.index(ref)
                try:
                    results[ref] = ray.get(ref, timeout=max(deadline - time.monotonic(), 1.0))
                except RayTaskError as error:  # the worker raised: its message first, then its traceback
                    cause = error.cause if isinstance(error.cause, BaseException) else error
                    raise RuntimeError(
                        f"rollout worker {rank} failed during {what}: {type(cause).__name__}: {cause}\n"
                        f"worker traceback:\n{error}"
                    ) from error
                except RayActorError as error:  # the worker process died
                    self._broken = f"worker {rank} died during {what}"
                    raise RuntimeError(f"rollout worker {rank} died during {what}: {error}") from error
                except (GetTimeoutError, RayError) as error:
                    self._broken = f"worker {rank} failed during {what}: {error}"
                    raise RuntimeError(f"rollout worker {rank} failed during {what}: {error}") from error
        return [results[ref] for ref in refs]

    def generate(
        self, prompts: Sequence[Prompt], sampling: SamplingConfig, *, timeout_s: float | None = None
    ) -> list[Sample]:
        """n samples per prompt over all workers (whole prompts per worker), returned in prompt order."""
        if len(prompts) == 0:
            raise ValueError("generate: empty batch (no prompts)")
        shards = shard_prompts(len(prompts), self.num_workers)
        refs = [
            self.workers[rank].generate.remote(list(prompts[start:end]), sampling, start)
            for rank, (start, end) in enumerate(shards)
        ]
        per_worker = self._gather(refs, "generate", timeout_s or self.timeout_s)
        return [sample for samples in per_worker for sample in samples]

    def update_weights(
        self, bucket_refs: list[ray.ObjectRef], policy_version: int, *, timeout_s: float | None = None
    ) -> list[dict]:
        """Every worker streams the buckets (each ref holds `list[tuple[str, Tensor]]`, Hugging Face names, full
        tensors) into its engine, one at a time. Returns per worker {"bytes", "seconds", "num_buckets"}."""
        if len(bucket_refs) == 0:
            raise ValueError("update_weights: no weight buckets")
        refs = [w.update_weights_from_refs.remote([list(bucket_refs)], policy_version) for w in self.workers]
        return self._gather(refs, "update_weights", timeout_s or self.timeout_s)

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
